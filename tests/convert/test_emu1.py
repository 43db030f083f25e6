"""The released Emu-1 / Emu-I checkpoint <-> ours (emu_mc/convert/emu1.py), on a tiny model in the released
key layout built here: the EVA tower of test_eva.py under `visual.`, an HF T5 decoder stack (the release's
causal former is one, with k/v of its cross-attention taking the vision width) under `cformer.cformer.`,
an HF LlamaForCausalLM under `decoder.lm.`. Converted outputs equal a direct forward of those tensors
(EVA reference -> LayerNorm -> T5 stack -> projection; HF LLaMA), the round trip is bit-exact, Emu-I's
LoRA merge equals running base + LoRA, and bad checkpoints stop with one line naming what is wrong."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emu_mc.config import Config, VisionConfig
from emu_mc.convert import ConversionError, load_pretrained
from emu_mc.convert.__main__ import main
from emu_mc.convert.emu1 import RELEASE_TOKENS, emu1_to_emu
from emu_mc.convert.hf import emu_to_hf_state
from emu_mc.convert.model_format import read_model_dir, read_model_meta
from emu_mc.tokenizer import load_tokenizer, special_token_ids
from tests.convert.test_eva import eva_reference, fake_eva_tower

VISION = VisionConfig(image_size=32, patch_size=8, width=64, num_layers=2, num_heads=4, mlp_hidden=256)
HEAD_DIMS = ["--vision-head-dim", "16", "--llm-head-dim", "16"]
BASE_VOCAB = 40  # the tokenizer's own pieces; the release adds its special tokens after them
QUERIES, D_MODEL, LLM_WIDTH = 4, 32, 64
LORA_RANK, LORA_SCALE = 4, 16.0 / 4  # alpha 16 / r


def make_tokenizer(directory) -> None:
    """A LLaMA-like tokenizer (bos, eos, unk, no pad) of BASE_VOCAB pieces, saved to `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(BASE_VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)


def make_t5_decoder(seed: int = 0):
    """The release's causal former stack: an HF T5 decoder (2 blocks, d_model 32, 4 heads of 8, 8 buckets)
    whose cross-attention k/v take the vision width, with random weights."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Stack

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=11, d_model=D_MODEL, d_kv=8, d_ff=64, num_heads=4, num_decoder_layers=2, num_layers=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=128, dropout_rate=0.0,
                   is_decoder=True, use_cache=False, feed_forward_proj="relu")
    cfg._attn_implementation = "eager"
    stack = T5Stack(cfg)
    stack.embed_tokens = torch.nn.Embedding(11, D_MODEL)  # the release keeps T5's (unused) embedding
    for block in stack.block:
        attn = block.layer[1].EncDecAttention
        attn.k, attn.v = (torch.nn.Linear(VISION.width, 32, bias=False) for _ in range(2))
    with torch.no_grad():
        for name, p in stack.named_parameters():
            p.normal_(1.0, 0.3) if "layer_norm" in name else p.normal_(0.0, 0.3)
    return stack.eval()


def make_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=BASE_VOCAB + 4, hidden_size=LLM_WIDTH, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, initializer_range=0.15,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    return model


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(released state dict, its T5 stack, its HF LLaMA, tokenizer dir, checkpoint path)."""
    d = tmp_path_factory.mktemp("emu1")
    make_tokenizer(d / "llama_config")
    g = torch.Generator().manual_seed(3)
    t5, llama = make_t5_decoder(), make_llama()
    state = {"visual." + k: v for k, v in fake_eva_tower(VISION).items()}
    state.update({"ln_visual.weight": torch.randn(VISION.width, generator=g) * 0.2 + 1,
                  "ln_visual.bias": torch.randn(VISION.width, generator=g) * 0.2,
                  "cformer.causal_tokens": torch.randn(1, QUERIES, D_MODEL, generator=g),
                  "cformer.projection.weight": torch.randn(LLM_WIDTH, D_MODEL, generator=g) * 0.2,
                  "cformer.projection.bias": torch.randn(LLM_WIDTH, generator=g) * 0.2})
    state.update({"cformer.cformer." + k: v.clone() for k, v in t5.state_dict().items()})
    state.update({"decoder.lm." + k: v.clone() for k, v in llama.state_dict().items()})
    state["decoder.lm.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)  # transformers 4.29 kept it
    state["decoder.lm.stu_regress_head.weight"] = torch.randn(LLM_WIDTH, LLM_WIDTH, generator=g) * 0.2
    path = d / "pytorch_model.bin"
    torch.save({"module": state, "global_steps": 1}, path)  # a DeepSpeed-style wrapper, as released
    return state, t5, llama, str(d / "llama_config"), str(path)


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    _, _, _, tok_dir, path = release
    out = tmp_path_factory.mktemp("converted") / "emu"
    assert main(["emu1-to-emu", "--emu1", path, "--tokenizer", tok_dir, "--out", str(out), *HEAD_DIMS]) == 0
    return str(out)


def loaded_model(directory):
    """An EmuModel built from the directory's config and loaded through model.init_from."""
    from emu_mc.model.emu import EmuModel

    model_cfg, _ = read_model_meta(directory)
    model_cfg.init_from = directory
    model_cfg.resampler.attention_impl = "reference"
    cfg = Config(model=model_cfg)
    tok = load_tokenizer(model_cfg.tokenizer)
    model = EmuModel(cfg.model, special_token_ids(tok), len(tok))
    load_pretrained(model, cfg.model)
    return model.eval(), tok


def direct_visual(state, t5, images):
    """The release's image path from its tensors: EVA forward_features -> ln_visual -> T5 stack -> projection."""
    tower = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    x = F.layer_norm(eva_reference(tower, images, VISION), (VISION.width,), state["ln_visual.weight"],
                     state["ln_visual.bias"], 1e-6)
    queries = state["cformer.causal_tokens"].expand(images.shape[0], -1, -1)
    h = t5(inputs_embeds=queries, encoder_hidden_states=x).last_hidden_state
    return F.linear(h, state["cformer.projection.weight"], state["cformer.projection.bias"])


@torch.no_grad()
def test_converted_model_equals_the_release_forward(release, converted, single_process_world):
    from tests.convert.llm_helpers import stage_forward

    state, t5, llama, _, _ = release
    model, tok = loaded_model(converted)
    ids = special_token_ids(tok)
    assert [ids.pad, ids.img_begin, ids.img_end, ids.img_slot] == list(range(BASE_VOCAB, BASE_VOCAB + 4))
    assert tok.convert_ids_to_tokens(list(range(BASE_VOCAB, BASE_VOCAB + 4))) == list(RELEASE_TOKENS)

    images = torch.randn(3, 3, VISION.image_size, VISION.image_size, generator=torch.Generator().manual_seed(1))
    visual = model.encode_images(images)
    torch.testing.assert_close(visual, direct_visual(state, t5, images), atol=1e-4, rtol=1e-4)

    tokens = torch.randint(0, BASE_VOCAB + 4, (2, 10), generator=torch.Generator().manual_seed(2))
    ours = stage_forward(model.llm, tokens)[..., : BASE_VOCAB + 4]
    torch.testing.assert_close(ours, llama(input_ids=tokens).logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.regress_head.weight, state["decoder.lm.stu_regress_head.weight"])


def test_round_trip_is_bit_exact(release, converted, tmp_path):
    state = release[0]
    assert main(["emu-to-emu1", "--emu", converted, "--out", str(tmp_path / "back.bin")]) == 0
    back = torch.load(tmp_path / "back.bin", weights_only=True)
    assert sorted(back) == sorted(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_emu_to_emu1_puts_special_rows_in_the_release_order(converted, tmp_path):
    """A model whose tokenizer numbers the special tokens otherwise (our loader on a LLaMA-like tokenizer:
    [IMG], [/IMG], <image>, then the pad) is written with its rows moved into the release's order, by token."""
    from transformers import AutoTokenizer

    from emu_mc.convert.llm_format import EMBEDDING, OUTPUT, write_llm_checkpoint

    model_cfg, llm, _, _, vocab = read_model_dir(converted)
    ours = tmp_path / "ours"
    ours.mkdir()
    for f in ("emu_mc_model.json", "vision.safetensors", "components.safetensors"):
        (ours / f).write_bytes((Path(converted) / f).read_bytes())
    released = AutoTokenizer.from_pretrained(str(Path(converted) / "tokenizer"))
    make_tokenizer(tmp_path / "fresh")
    fresh = AutoTokenizer.from_pretrained(str(tmp_path / "fresh"))
    fresh.add_special_tokens({"additional_special_tokens": ["[IMG]", "[/IMG]", "<image>"]})
    fresh.add_special_tokens({"pad_token": "[PAD]"})
    fresh.save_pretrained(ours / "tokenizer")
    row_of = torch.tensor(released.convert_tokens_to_ids(fresh.convert_ids_to_tokens(list(range(vocab)))))
    assert not torch.equal(row_of, torch.arange(vocab))
    write_llm_checkpoint(str(ours), {k: (v[row_of] if k in (EMBEDDING, OUTPUT) else v) for k, v in llm.items()},
                         model_cfg.llm, vocab)
    assert main(["emu-to-emu1", "--emu", str(ours), "--out", str(tmp_path / "a.bin")]) == 0
    assert main(["emu-to-emu1", "--emu", converted, "--out", str(tmp_path / "b.bin")]) == 0
    a, b = (torch.load(tmp_path / n, weights_only=True) for n in ("a.bin", "b.bin"))
    for name in ("decoder.lm.model.embed_tokens.weight", "decoder.lm.lm_head.weight"):
        assert torch.equal(a[name], b[name]), name


def instruct_state(state, seed: int = 5):
    """Emu-I's layout: the LLM under peft (base_model.model.), LoRA A/B on q, k, v, o; vocab + [USER], [ASSISTANT]."""
    g = torch.Generator().manual_seed(seed)
    out, lora = {}, {}
    for name, tensor in state.items():
        if not name.startswith("decoder.lm."):
            out[name] = tensor
            continue
        new = "decoder.lm.base_model.model." + name[len("decoder.lm."):]
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            tensor = torch.cat([tensor, torch.randn(2, tensor.shape[1], generator=g) * 0.2])
        out[new] = tensor
        if any(name.endswith(f"self_attn.{p}_proj.weight") for p in "qkvo"):
            stem = new[: -len(".weight")]
            lora[stem] = (torch.randn(LORA_RANK, tensor.shape[1], generator=g) * 0.3,
                          torch.randn(tensor.shape[0], LORA_RANK, generator=g) * 0.3)
            out[stem + ".lora_A.default.weight"], out[stem + ".lora_B.default.weight"] = lora[stem]
    return out, lora


@torch.no_grad()
def test_instruct_lora_merge_equals_base_plus_lora(release, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from emu_mc.convert.llm_format import read_llm_checkpoint
    from emu_mc.convert.model_format import read_model_meta

    state, _, llama, tok_dir, _ = release
    peft, lora = instruct_state(state)
    torch.save(peft, tmp_path / "emu_i.bin")
    out = tmp_path / "emu_i"
    assert main(["emu1-to-emu", "--emu1", str(tmp_path / "emu_i.bin"), "--tokenizer", tok_dir, "--out", str(out),
                 "--instruct", *HEAD_DIMS]) == 0
    ids = special_token_ids(load_tokenizer(str(out / "tokenizer")))
    assert ids.pad == BASE_VOCAB and ids.img_slot == BASE_VOCAB + 3
    assert (ids.user, ids.assistant) == (BASE_VOCAB + 4, BASE_VOCAB + 5)  # chat data and --chat use these
    assert read_model_meta(str(out))[0].chat_tokens

    base = LlamaForCausalLM(llama.config.__class__(**{**llama.config.to_dict(), "vocab_size": BASE_VOCAB + 6})).eval()
    prefix = "decoder.lm.base_model.model."
    base.load_state_dict({k[len(prefix):]: v for k, v in peft.items()
                          if k.startswith(prefix) and "lora_" not in k and "stu_regress" not in k and "inv_freq" not in k})
    for stem, (a, b) in lora.items():  # run base + LoRA: y = W x + (B A x) * alpha / r
        module = base.get_submodule(stem[len(prefix):])
        module.register_forward_hook(lambda m, inp, y, a=a, b=b: y + F.linear(F.linear(inp[0], a), b) * LORA_SCALE)
    tokens = torch.randint(0, BASE_VOCAB + 6, (2, 10), generator=torch.Generator().manual_seed(4))
    expected = base(input_ids=tokens).logits

    merged_llm, llm_cfg, _ = read_llm_checkpoint(str(out))
    merged = LlamaForCausalLM(base.config).eval()
    merged.load_state_dict(emu_to_hf_state(merged_llm, llm_cfg))
    torch.testing.assert_close(merged(input_ids=tokens).logits, expected, atol=1e-4, rtol=1e-4)

    assert main(["emu-to-emu1", "--emu", str(out), "--out", str(tmp_path / "back.bin"), "--instruct"]) == 0
    back = torch.load(tmp_path / "back.bin", weights_only=True)
    assert sorted(back) == sorted(peft)
    assert not back[prefix + "model.layers.0.self_attn.q_proj.lora_B.default.weight"].any()


def test_converted_directory_loads_for_generation(converted, single_process_world):
    from emu_mc.inference.loading import load_emu

    loaded = load_emu(converted)
    assert loaded.ids.img_slot == BASE_VOCAB + 3 and loaded.model.cfg.resampler.num_queries == QUERIES


BAD = {  # name: (edit of the released state dict, extra flags, message expected on stderr)
    "missing": (lambda s: s.pop("cformer.cformer.block.1.layer.2.DenseReluDense.wo.weight"), [],
                r"missing tensor 'cformer\.block\.1\.layer\.2\.DenseReluDense\.wo\.weight'"),
    "unexpected": (lambda s: s.__setitem__("text_decoder.weight", torch.zeros(2)), [],
                   r"unexpected tensor 'text_decoder\.weight'"),
    "shape": (lambda s: s.__setitem__("decoder.lm.stu_regress_head.weight", torch.zeros(LLM_WIDTH, 8)), [],
              r"regress_head\.weight in the released checkpoint: expected shape \(64, 64\), found \(64, 8\)"),
    "llm-shape": (lambda s: s.__setitem__("decoder.lm.model.layers.1.mlp.up_proj.weight", torch.zeros(3, LLM_WIDTH)), [],
                  r"model\.layers\.1\.mlp\.up_proj\.weight in HF checkpoint: expected shape"),
    "not-instruct": (lambda s: None, ["--instruct"], r"--instruct: no peft-wrapped LLM"),
    "vocab": (lambda s: s.__setitem__("decoder.lm.model.embed_tokens.weight",
                                      torch.zeros(BASE_VOCAB + 3, LLM_WIDTH)), [],
              r"but the checkpoint has 43 vocab rows"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_release_checkpoint_is_one_line_exit_2(release, tmp_path, capsys, case):
    edit, flags, message = BAD[case]
    state = dict(release[0])
    if case == "vocab":
        state["decoder.lm.lm_head.weight"] = torch.zeros(BASE_VOCAB + 3, LLM_WIDTH)
    edit(state)
    torch.save(state, tmp_path / "bad.bin")
    code = main(["emu1-to-emu", "--emu1", str(tmp_path / "bad.bin"), "--tokenizer", release[3],
                 "--out", str(tmp_path / "out"), *HEAD_DIMS, *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_unreadable_release_checkpoint(tmp_path, capsys):
    (tmp_path / "x.bin").write_bytes(b"not a pickle")
    assert main(["emu1-to-emu", "--emu1", str(tmp_path / "x.bin"), "--tokenizer", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "unreadable or damaged tensor file" in capsys.readouterr().err


def test_library_error_type(release, tmp_path):
    state = {k: v for k, v in release[0].items() if not k.startswith("ln_visual.")}
    torch.save(state, tmp_path / "no_ln.bin")
    with pytest.raises(ConversionError, match=r"released ln_visual: missing tensor 'bias' \(\+1 more\)"):
        emu1_to_emu(str(tmp_path / "no_ln.bin"), str(tmp_path / "o"), release[3], vision_head_dim=16, llm_head_dim=16)
