"""LoRA adapters on megatron's fused QKV and output projection (emu_mc/model/lora.py), in one process (TP = 1):
the fused layout computes per-projection LoRA on q, k, v and o (checked against megatron's own q/k/v
split of its output), merging reproduces the adapter model's logits, only adapters train, a fresh
adapter changes nothing. TP / PP parity and training: tests/train/test_finetune.py."""
import pytest
import torch

from emu_mc.config import load_config
from emu_mc.convert.hf import split_qkv
from emu_mc.model.lora import (LoRASettings, adapted_linears, has_adapters, init_adapters, is_adapter,
                               merge_adapters)
from tests.convert.llm_helpers import stage_forward

LORA = LoRASettings(rank=4, alpha=8.0, dropout=0.0)
ATOL = 1e-5  # fp32


def tiny_emu(special_ids, tokenizer, lora=LORA, layers=2):
    from emu_mc.model.emu import EmuModel

    cfg = load_config("configs/tiny.yaml", ["--model.llm.num_layers", str(layers)])
    torch.manual_seed(0)
    return EmuModel(cfg.model, special_ids, len(tokenizer), lora=lora)


@torch.no_grad()
def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if is_adapter(name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_fused_qkv_and_proj_equal_per_projection_lora(single_process_world, special_ids, tokenizer):
    model = tiny_emu(special_ids, tokenizer)
    randomize_adapters(model)
    attention = model.llm.decoder.layers[0].self_attention
    cfg, s = model.config, LORA.scaling
    heads, groups, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    assert groups < heads  # the tiny config is GQA: the per-group interleaving matters
    x = torch.randn(5, 3, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        query, key, value = attention.get_query_key_value_tensors(x)[:3]  # [S, B, heads, d] each
        qkv = attention.linear_qkv
        w_q, w_k, w_v = split_qkv(qkv.weight, groups, d)
        for name, w, got in (("q", w_q, query), ("k", w_k, key), ("v", w_v, value)):
            a, b = getattr(qkv, f"lora_a_{name}"), getattr(qkv, f"lora_b_{name}")
            expected = x @ w.t() + s * (x @ a.t()) @ b.t()  # peft's LoRA on the unfused projection
            torch.testing.assert_close(got.reshape(expected.shape), expected, atol=ATOL, rtol=0)
        proj = attention.linear_proj
        ctx = torch.randn(5, 3, heads * d)
        expected = ctx @ proj.weight.t() + s * (ctx @ proj.lora_a.t()) @ proj.lora_b.t()
        torch.testing.assert_close(proj(ctx)[0], expected, atol=ATOL, rtol=0)


def test_merged_weights_reproduce_the_adapter_models_logits(single_process_world, special_ids, tokenizer):
    model = tiny_emu(special_ids, tokenizer).eval()
    randomize_adapters(model)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = stage_forward(model.llm, ids)
        assert merge_adapters(model) == 2 * 2  # qkv and proj of 2 layers
        assert not has_adapters(model) and model.lora is None
        merged = stage_forward(model.llm, ids)
    diff = (merged - adapted).abs().max().item()
    print(f"merged vs adapter logits: max abs diff {diff:.2e}")
    assert diff <= ATOL
    plain = set(tiny_emu(special_ids, tokenizer, lora=None).state_dict())
    assert set(model.state_dict()) == plain  # the merged model is a plain one: export and load as such


def test_only_adapters_train_and_a_fresh_adapter_changes_nothing(single_process_world, special_ids, tokenizer):
    model = tiny_emu(special_ids, tokenizer).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter(n) and ".self_attention.linear_" in n for n in trainable)
    assert len(trainable) == 2 * (6 + 2)  # per layer: A and B of q, k, v, o
    init_adapters(model.llm, seed=5)
    ids = torch.randint(0, len(tokenizer), (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fresh = stage_forward(model.llm, ids)
        for _, module in adapted_linears(model.llm):
            assert all(getattr(module, n).abs().sum() > 0 for n in module.adapter_names() if "lora_a" in n)
        merge_adapters(model)
        assert torch.equal(stage_forward(model.llm, ids), fresh)  # B = 0: the base model's output


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_adapter_dropout_is_training_only(single_process_world, special_ids, tokenizer, p):
    model = tiny_emu(special_ids, tokenizer, lora=LoRASettings(4, 4.0, p), layers=1)
    randomize_adapters(model)
    proj = model.llm.decoder.layers[0].self_attention.linear_proj
    ctx = torch.randn(4, 2, proj.input_size)
    with torch.no_grad():
        model.train()
        a, b = proj(ctx)[0], proj(ctx)[0]
        model.eval()
        c, d = proj(ctx)[0], proj(ctx)[0]
    assert torch.equal(c, d)
    assert torch.equal(a, b) == (p == 0.0)
