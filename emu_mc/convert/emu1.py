"""The released Emu-1 checkpoint (baaivision/Emu, Emu1/models: modeling_emu.py, eva_vit_model.py,
causal_former.py, modeling_llama.py) <-> our whole-model format (model_format.py).

    python -m emu_mc.convert emu1-to-emu --emu1 Emu-14B/pytorch_model.bin --tokenizer Emu1/models/llama_config --out DIR
    python -m emu_mc.convert emu1-to-emu --emu1 Emu-instruct.pt --tokenizer ... --out DIR --instruct
    python -m emu_mc.convert emu-to-emu1 --emu DIR --out pytorch_model.bin [--instruct]

The released state dict (possibly under a `module` key), release name -> ours:
    visual.*                                   -> vision.safetensors (eva.py; q_bias/v_bias fused into qkv.bias
                                                  with a zero k bias; visual.norm.* and visual.head.* dropped)
    ln_visual.{weight,bias}                    -> ln_visual.*
    cformer.causal_tokens [1, Q, D]            -> resampler.queries [Q, D]
    cformer.cformer.block.0.layer.0.SelfAttention.relative_attention_bias.weight -> resampler.rel_bias
    cformer.cformer.block.{i}.layer.0.{layer_norm, SelfAttention.{q,k,v,o}}     -> resampler.layers.{i}.{self_norm, self_attn.*}
    cformer.cformer.block.{i}.layer.1.{layer_norm, EncDecAttention.{q,k,v,o}}   -> ...{cross_norm, cross_attn.*}
    cformer.cformer.block.{i}.layer.2.{layer_norm, DenseReluDense.{wi,wo}}      -> ...{ff_norm, wi, wo}
    cformer.cformer.final_layer_norm           -> resampler.final_norm
    cformer.projection.{weight,bias}           -> resampler.proj.*
    cformer.cformer.embed_tokens.weight        -> dropped (the queries are the inputs)
    decoder.lm.{model.*, lm_head.weight}       -> llm.safetensors (hf.py's LLaMA mapping; rotary inv_freq dropped)
    decoder.lm.stu_regress_head.weight         -> regress_head.weight
Emu-I (--instruct) wraps decoder.lm in peft: `decoder.lm.base_model.model.` instead of `decoder.lm.`, and
q/k/v/o_proj carry `lora_A[.default].weight` [r, in] and `lora_B[.default].weight` [out, r] (the base
weight possibly as `base_layer.weight`); they are merged as W + B A * alpha / r (alpha = 16 as released).

Special tokens: the release's tokenizer is LLaMA's 32000 pieces plus, in this order, `[PAD]` 32000,
`[IMG]` 32001, `[/IMG]` 32002, `<image>` 32003 (Emu-I: `[USER]` 32004, `[ASSISTANT]` 32005). The
converted directory ships that tokenizer (tokenizer/), so no embedding row moves on import; our
tokenizer loader keeps tokens already present at their ids. emu-to-emu1 reorders the vocab rows of a
model whose tokenizer numbers these tokens otherwise (e.g. one pretrained here from a LLaMA tokenizer)
into the release's order, by token.

Tensors we drop are kept in emu1_unused.safetensors in the output directory; emu-to-emu1 puts them
back, so emu1 -> emu -> emu1 is bit-exact for every tensor.
"""
import os
import re
from typing import Dict, List, Tuple

import torch

from emu_mc.config import LLMConfig, ModelConfig, ResamplerConfig, VisionConfig
from emu_mc.convert.errors import ConversionError, check_keys, check_shape
from emu_mc.convert.eva import describe_vision, eva_state_to_emu
from emu_mc.convert.hf import HF_LAYER_PREFIX, emu_to_hf_state, hf_to_emu_state
from emu_mc.convert.model_format import TOKENIZER_DIR, read_model_dir, write_model_dir
from emu_mc.convert.tensor_files import StateDict, read_tensor_file, write_safetensors
from emu_mc.tokenizer import IMG_BEGIN, IMG_END, IMG_SLOT

PAD, USER, ASSISTANT = "[PAD]", "[USER]", "[ASSISTANT]"
RELEASE_TOKENS = (PAD, IMG_BEGIN, IMG_END, IMG_SLOT)  # added after LLaMA's pieces, in this order
INSTRUCT_TOKENS = RELEASE_TOKENS + (USER, ASSISTANT)
LLM_PREFIX, PEFT_PREFIX = "decoder.lm.", "decoder.lm.base_model.model."
T5_PREFIX = "cformer.cformer."
REL_BIAS = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
UNUSED_FILE = "emu1_unused.safetensors"
LORA_ALPHA, LORA_RANK = 16.0, 16  # Emu-I's peft LoraConfig
# Released resampler names (inside one T5 block) -> ours (inside resampler.layers.{i}).
T5_BLOCK = {"layer.0.layer_norm.weight": "self_norm.weight",
            **{f"layer.0.SelfAttention.{p}.weight": f"self_attn.{p}.weight" for p in "qkvo"},
            "layer.1.layer_norm.weight": "cross_norm.weight",
            **{f"layer.1.EncDecAttention.{p}.weight": f"cross_attn.{p}.weight" for p in "qkvo"},
            "layer.2.layer_norm.weight": "ff_norm.weight",
            "layer.2.DenseReluDense.wi.weight": "wi.weight", "layer.2.DenseReluDense.wo.weight": "wo.weight"}
_DROPPED = re.compile(r"visual\.(norm|fc_norm|head)\..+|cformer\.cformer\.embed_tokens\.weight|.*rotary_emb\.inv_freq")
_LORA = re.compile(r"(.+)\.lora_([AB])(?:\.default)?\.weight")


# --------------------------------------------------------------------------- release -> ours


def merge_lora(peft: StateDict, alpha: float) -> StateDict:
    """peft LlamaForCausalLM tensors (names without the `base_model.model.` prefix) -> plain ones with
    every LoRA pair merged: W + B A * alpha / r, computed in fp32 and stored in W's dtype."""
    base = {k.replace(".base_layer.", "."): v for k, v in peft.items() if not _LORA.fullmatch(k)}
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in peft.items():
        m = _LORA.fullmatch(name)
        if m:
            pairs.setdefault(m[1] + ".weight", {})[m[2]] = tensor
    if not pairs:
        raise ConversionError("--instruct: no LoRA tensors (*.lora_A/lora_B.weight) in the checkpoint's LLM")
    for weight, ab in pairs.items():
        if set(ab) != {"A", "B"} or weight not in base:
            raise ConversionError(f"LoRA of {weight}: found {sorted('lora_' + k for k in ab)}"
                                  f"{'' if weight in base else ' and no base weight'}; expected lora_A, lora_B and the weight")
        a, b, w = ab["A"].float(), ab["B"].float(), base[weight]
        if a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ConversionError(f"LoRA of {weight}: lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)} "
                                  f"does not give the weight's shape {tuple(w.shape)}")
        base[weight] = (w.float() + (b @ a) * (alpha / a.shape[0])).to(w.dtype)
    return base


def split_release(state: StateDict, instruct: bool) -> Tuple[Dict[str, StateDict], StateDict]:
    """The released state dict -> ({"visual", "ln_visual", "cformer", "llm"} tensors with their prefixes
    stripped; "llm" holds the HF LlamaForCausalLM names plus stu_regress_head.weight), dropped tensors."""
    lm_prefix = PEFT_PREFIX if instruct else LLM_PREFIX
    if not instruct and any(k.startswith(PEFT_PREFIX) for k in state):
        raise ConversionError("the checkpoint's LLM is wrapped in peft (decoder.lm.base_model.model.*, Emu-I): "
                              "convert it with --instruct")
    if instruct and not any(k.startswith(PEFT_PREFIX) for k in state):
        raise ConversionError("--instruct: no peft-wrapped LLM (decoder.lm.base_model.model.*) in the checkpoint; "
                              "for Emu-14B leave --instruct out")
    groups: Dict[str, StateDict] = {"visual": {}, "ln_visual": {}, "cformer": {}, "llm": {}}
    dropped, unknown = {}, []
    for name, tensor in state.items():
        if _DROPPED.fullmatch(name):
            dropped[name] = tensor
        elif name.startswith(lm_prefix):
            groups["llm"][name[len(lm_prefix):]] = tensor
        elif name.split(".")[0] in ("visual", "ln_visual", "cformer"):
            head, rest = name.split(".", 1)
            groups[head][rest] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise ConversionError(f"released checkpoint: unexpected tensor {unknown[0]!r}"
                              + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else "")
                              + "; expected visual.*, ln_visual.*, cformer.*, decoder.lm.*")
    return groups, dropped


def resampler_from_release(cformer: StateDict) -> StateDict:
    """`cformer.*` tensors (prefix stripped) -> our CausalResampler state dict."""
    blocks = sorted({int(k.split(".")[2]) for k in cformer if k.startswith("cformer.block.")})
    expected = ["causal_tokens", "projection.weight", "projection.bias", "cformer.final_layer_norm.weight",
                "cformer." + REL_BIAS] + [f"cformer.block.{i}.{n}" for i in blocks for n in T5_BLOCK]
    check_keys(expected, list(cformer), "released resampler (cformer.*)")
    ours = {"queries": cformer["causal_tokens"].reshape(cformer["causal_tokens"].shape[1:]),
            "rel_bias": cformer["cformer." + REL_BIAS], "final_norm.weight": cformer["cformer.final_layer_norm.weight"],
            "proj.weight": cformer["projection.weight"], "proj.bias": cformer["projection.bias"]}
    for i in blocks:
        ours.update({f"layers.{i}.{n}": cformer[f"cformer.block.{i}.{t}"] for t, n in T5_BLOCK.items()})
    return ours


def model_config_from_release(vision: StateDict, resampler: StateDict, llm_hf: StateDict, *,
                              vision_head_dim: int, llm_head_dim: int) -> ModelConfig:
    """Our ModelConfig read off the tensors' shapes; head counts (not in any shape) from the head widths,
    eps, RoPE base, T5's max_distance and the resampler dropout as released."""
    v = describe_vision(vision)
    queries, d_model = resampler["queries"].shape
    buckets, heads = resampler["rel_bias"].shape
    hidden = llm_hf["model.embed_tokens.weight"].shape[1]
    for what, width, head_dim in (("vision width", v["width"], vision_head_dim), ("LLM width", hidden, llm_head_dim)):
        if width % head_dim:
            raise ConversionError(f"{what} {width} is not a multiple of the head width {head_dim}; set "
                                  f"--{what.split()[0].lower()}-head-dim")
    llm_heads = hidden // llm_head_dim
    kv_heads = llm_hf[HF_LAYER_PREFIX.format(0) + "self_attn.k_proj.weight"].shape[0] // llm_head_dim
    return ModelConfig(
        vision=VisionConfig(**v, num_heads=v["width"] // vision_head_dim, norm_eps=1e-6),
        resampler=ResamplerConfig(
            num_queries=queries, d_model=d_model,
            num_layers=len({k.split(".")[1] for k in resampler if k.startswith("layers.")}),
            num_heads=heads, d_kv=resampler["layers.0.self_attn.q.weight"].shape[0] // heads,
            d_ff=resampler["layers.0.wi.weight"].shape[0], num_buckets=buckets, max_distance=128, dropout=0.1,
            norm_eps=1e-6),
        llm=LLMConfig(
            num_layers=len({k.split(".")[2] for k in llm_hf if k.startswith("model.layers.")}), hidden_size=hidden,
            num_attention_heads=llm_heads, num_query_groups=None if kv_heads == llm_heads else kv_heads,
            ffn_hidden_size=llm_hf[HF_LAYER_PREFIX.format(0) + "mlp.gate_proj.weight"].shape[0], norm_eps=1e-6,
            rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False),
    )


def release_tokenizer(tokenizer_dir: str, instruct: bool, vocab_rows: int):
    """The release's tokenizer: the LLaMA tokenizer at `tokenizer_dir` plus RELEASE_TOKENS (and
    [USER], [ASSISTANT] for Emu-I) at the ids the released model was trained with."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConversionError(f"--tokenizer {tokenizer_dir}: not a local HF tokenizer directory ({e})") from None
    tokens = INSTRUCT_TOKENS if instruct else RELEASE_TOKENS
    base = len(tok)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD})
    tok.add_special_tokens({"additional_special_tokens": list(tokens[1:])})
    ids = [tok.convert_tokens_to_ids(t) if t != PAD else tok.pad_token_id for t in tokens]
    if ids != list(range(base, base + len(tokens))) or len(tok) != vocab_rows:
        raise ConversionError(
            f"--tokenizer {tokenizer_dir}: {base} pieces + {', '.join(tokens)} give ids {ids} and {len(tok)} "
            f"tokens, but the checkpoint has {vocab_rows} vocab rows (the release adds them after LLaMA's 32000 "
            "pieces, which have no pad token: use the release's Emu1/models/llama_config)")
    return tok


def emu1_to_emu(emu1_file: str, out_dir: str, tokenizer_dir: str, *, instruct: bool = False,
                lora_alpha: float = LORA_ALPHA, vision_head_dim: int = 88, llm_head_dim: int = 128
                ) -> Tuple[ModelConfig, int, List[str]]:
    """Convert the released checkpoint into our whole-model format at `out_dir` (model.init_from and
    generation load it). Returns (ModelConfig, vocab size, names of the dropped tensors)."""
    groups, dropped = split_release(read_tensor_file(emu1_file), instruct)
    llm_hf = groups["llm"]
    if instruct:
        llm_hf = merge_lora(llm_hf, lora_alpha)
    lm_prefix = PEFT_PREFIX if instruct else LLM_PREFIX
    for needed in ("stu_regress_head.weight", "model.embed_tokens.weight", HF_LAYER_PREFIX.format(0) + "self_attn.k_proj.weight"):
        if needed not in llm_hf:
            raise ConversionError(f"{emu1_file}: missing tensor {lm_prefix + needed!r}")
    regress_head = llm_hf.pop("stu_regress_head.weight")
    vision = eva_state_to_emu(groups["visual"])
    check_keys(["weight", "bias"], list(groups["ln_visual"]), "released ln_visual")
    resampler = resampler_from_release(groups["cformer"])
    model_cfg = model_config_from_release(vision, resampler, llm_hf, vision_head_dim=vision_head_dim,
                                          llm_head_dim=llm_head_dim)
    vocab = llm_hf["model.embed_tokens.weight"].shape[0]
    llm = hf_to_emu_state(llm_hf, model_cfg.llm, vocab)
    components = {**{"ln_visual." + k: v for k, v in groups["ln_visual"].items()},
                  **{"resampler." + k: v for k, v in resampler.items()}, "regress_head.weight": regress_head}
    tok = release_tokenizer(tokenizer_dir, instruct, vocab)
    model_cfg.tokenizer = os.path.abspath(os.path.join(out_dir, TOKENIZER_DIR))
    model_cfg.chat_tokens = instruct  # Emu-I's tokenizer has [USER] / [ASSISTANT] (32004, 32005)
    os.makedirs(out_dir, exist_ok=True)
    # Build a throwaway model to check every name and shape against what init_from loads.
    _check_against_model(model_cfg, vision, components)
    write_model_dir(out_dir, model_cfg, vocab, llm, vision, components, tok,
                    {"emu1": os.path.abspath(emu1_file), "instruct": instruct})
    write_safetensors(os.path.join(out_dir, UNUSED_FILE), dropped)
    return model_cfg, vocab, sorted(dropped)


def _check_against_model(model_cfg: ModelConfig, vision: StateDict, components: StateDict) -> None:
    """ConversionError naming the first tensor whose name or shape differs from a model built from
    `model_cfg` (vision side and regression head; the LLM is checked by write_llm_checkpoint)."""
    from emu_mc.model.resampler import CausalResampler
    from emu_mc.model.vision import VisionTransformer

    with torch.device("meta"):
        expected = {"vision." + k: v for k, v in VisionTransformer(model_cfg.vision).state_dict().items()}
        expected.update({"resampler." + k: v for k, v in CausalResampler(
            model_cfg.resampler, model_cfg.vision.width, model_cfg.llm.hidden_size).state_dict().items()})
    w, h = model_cfg.vision.width, model_cfg.llm.hidden_size
    expected.update({"ln_visual.weight": torch.empty(w, device="meta"), "ln_visual.bias": torch.empty(w, device="meta"),
                     "regress_head.weight": torch.empty(h, h, device="meta")})
    found = {**{"vision." + k: v for k, v in vision.items()}, **components}
    check_keys(list(expected), list(found), "converted Emu-1 model")
    for name, tensor in expected.items():
        check_shape(name, tensor.shape, found[name].shape, " in the released checkpoint")


# --------------------------------------------------------------------------- ours -> release


def release_row_order(tokenizer, instruct: bool) -> torch.Tensor:
    """Index [V] such that rows[index] puts our tokenizer's vocab rows in the release's order: the
    base pieces first, then INSTRUCT_TOKENS / RELEASE_TOKENS. ConversionError if a token is absent or
    the tokenizer has other added tokens."""
    tokens = INSTRUCT_TOKENS if instruct else RELEASE_TOKENS
    ids = [tokenizer.pad_token_id if t == PAD else tokenizer.convert_tokens_to_ids(t) for t in tokens]
    base = len(tokenizer) - len(tokens)
    missing = [t for t, i in zip(tokens, ids) if i is None or i == tokenizer.unk_token_id]
    if missing or sorted(ids) != list(range(base, len(tokenizer))):
        raise ConversionError(f"tokenizer: the release needs {', '.join(tokens)} as the last {len(tokens)} tokens; "
                              f"this one has ids {dict(zip(tokens, ids))} of {len(tokenizer)}"
                              + (" (Emu-I's [USER]/[ASSISTANT] are missing: drop --instruct?)" if missing else ""))
    return torch.cat([torch.arange(base), torch.tensor(ids)])


def emu_to_emu1(emu_dir: str, out_file: str, *, instruct: bool = False) -> int:
    """Our whole-model directory -> the released state dict, saved with torch.save at `out_file`
    (loads into the released Emu with load_state_dict; --instruct: into Emu-I's peft-wrapped LLM, with
    the LoRA factors zero since the weights are merged). Returns the number of tensors written."""
    from emu_mc.convert.llm_format import EMBEDDING, OUTPUT
    from emu_mc.tokenizer import tokenizer_dir
    from transformers import AutoTokenizer

    model_cfg, llm, vision, components, _ = read_model_dir(emu_dir)
    tok_dir = os.path.join(emu_dir, TOKENIZER_DIR)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir(tok_dir), local_files_only=True)
    except (OSError, ValueError, FileNotFoundError) as e:
        raise ConversionError(f"{tok_dir}: missing or unreadable tokenizer ({e})") from None
    order = release_row_order(tok, instruct)
    llm = {k: (v[order] if k in (EMBEDDING, OUTPUT) else v) for k, v in llm.items()}
    lm_prefix = PEFT_PREFIX if instruct else LLM_PREFIX
    release: StateDict = {lm_prefix + k: v for k, v in emu_to_hf_state(llm, model_cfg.llm).items()}
    release[lm_prefix + "stu_regress_head.weight"] = components["regress_head.weight"]
    if instruct:
        for name in [k for k in release if re.search(r"self_attn\.[qkvo]_proj\.weight$", k)]:
            out_features, in_features = release[name].shape
            stem, dtype = name[: -len(".weight")], release[name].dtype
            release[stem + ".lora_A.default.weight"] = torch.zeros(LORA_RANK, in_features, dtype=dtype)
            release[stem + ".lora_B.default.weight"] = torch.zeros(out_features, LORA_RANK, dtype=dtype)
    release.update(_vision_to_release(vision))
    release.update({k: v for k, v in components.items() if k.startswith("ln_visual.")})
    release.update(_resampler_to_release({k[len("resampler."):]: v for k, v in components.items()
                                          if k.startswith("resampler.")}))
    unused = os.path.join(emu_dir, UNUSED_FILE)
    if os.path.isfile(unused):
        release.update(read_tensor_file(unused))
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    torch.save({k: v.contiguous() for k, v in release.items()}, out_file)
    return len(release)


def _vision_to_release(vision: StateDict) -> StateDict:
    """Our VisionTransformer tensors -> the release's `visual.*` (qkv.bias split back into q_bias, v_bias)."""
    out = {}
    for name, tensor in vision.items():
        if name.endswith("attn.qkv.bias"):
            q, _, v = tensor.chunk(3)
            stem = "visual." + name[: -len("qkv.bias")]
            out[stem + "q_bias"], out[stem + "v_bias"] = q, v
        else:
            out["visual." + name.replace("patch_embed.", "patch_embed.proj.")] = tensor
    return out


def _resampler_to_release(ours: StateDict) -> StateDict:
    """Our CausalResampler state dict -> the release's `cformer.*` (inverse of resampler_from_release)."""
    out = {"cformer.causal_tokens": ours["queries"][None], "cformer.projection.weight": ours["proj.weight"],
           "cformer.projection.bias": ours["proj.bias"], T5_PREFIX + REL_BIAS: ours["rel_bias"],
           T5_PREFIX + "final_layer_norm.weight": ours["final_norm.weight"]}
    layers = sorted({int(k.split(".")[1]) for k in ours if k.startswith("layers.")})
    for i in layers:
        out.update({f"{T5_PREFIX}block.{i}.{t}": ours[f"layers.{i}.{n}"] for t, n in T5_BLOCK.items()})
    return out


def describe(model_cfg: ModelConfig) -> str:
    """One line naming the converted sizes."""
    v, r, l = model_cfg.vision, model_cfg.resampler, model_cfg.llm
    return (f"vision {v.num_layers}x{v.width} ({v.num_heads} heads), resampler {r.num_layers}x{r.d_model} "
            f"({r.num_queries} queries), LLM {l.num_layers}x{l.hidden_size} ({l.num_attention_heads} heads)")


