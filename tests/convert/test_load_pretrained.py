"""load_pretrained applies model.llm.init_from / model.vision.init_from to an EmuModel (TP=1)."""
import pytest
import torch

from emu_mc.convert import ConversionError, eva_to_emu, hf_to_emu, load_pretrained, read_llm_checkpoint
from emu_mc.convert.tensor_files import read_tensor_file
from emu_mc.model.emu import EmuModel
from tests.convert.llm_helpers import VOCAB, make_hf_llama
from tests.convert.test_eva import fake_eva_tower


def test_load_pretrained(single_process_world, tiny_cfg, tokenizer, special_ids, tmp_path):
    make_hf_llama(tmp_path / "hf")  # the tiny LLM's shape, rms_norm_eps 1e-5
    hf_to_emu(str(tmp_path / "hf"), str(tmp_path / "llm"))
    torch.save({"visual." + k: v for k, v in fake_eva_tower(tiny_cfg.model.vision).items()}, tmp_path / "eva.pt")
    eva_to_emu(str(tmp_path / "eva.pt"), str(tmp_path / "vision.safetensors"))

    cfg = tiny_cfg.model
    model = EmuModel(cfg, special_ids, len(tokenizer))
    bound = cfg.llm.hidden_size ** -0.5  # the regression head starts as nn.Linear's default, as released
    assert 0.5 * bound < model.regress_head.weight.abs().max() <= bound
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    load_pretrained(model, cfg)  # no init_from: nothing changes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    cfg.llm.init_from, cfg.vision.init_from = str(tmp_path / "llm"), str(tmp_path / "vision.safetensors")
    with pytest.raises(ConversionError, match=r"norm_eps: 1e-05 vs 1e-06"):
        load_pretrained(model, cfg)
    cfg.llm.norm_eps = 1e-5
    load_pretrained(model, cfg)

    state = read_llm_checkpoint(cfg.llm.init_from)[0]
    embedding = model.llm.embedding.word_embeddings.weight
    assert torch.equal(embedding[:VOCAB], state["embedding.word_embeddings.weight"])
    mean = state["embedding.word_embeddings.weight"].mean(dim=0)
    extra = len(tokenizer) - VOCAB  # the tokenizer's added tokens start at the mean row, as released
    assert extra > 0 and torch.allclose(embedding[VOCAB:len(tokenizer)], mean.expand(extra, -1), atol=1e-6)
    assert not embedding[len(tokenizer):].any()  # padding rows start at zero
    assert torch.equal(model.llm.decoder.layers[1].mlp.linear_fc1.weight, state["decoder.layers.1.mlp.linear_fc1.weight"])
    vision = read_tensor_file(cfg.vision.init_from)
    assert all(torch.equal(model.vision.state_dict()[k], v) for k, v in vision.items())
