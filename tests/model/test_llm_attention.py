"""The LLM's megatron layers with each attention backend against `local` (megatron's unfused attention
with the dense mask): same hidden states and gradients on packed rows, same checkpoint names, and the
same gradients under activation recompute. The TP x PP check is in tests/parallel/test_layouts.py."""
import pytest
import torch

from emu_mc.config import LLMConfig
from emu_mc.model.llm import build_llm, llm_hidden_states
from emu_mc.model import document_attention, llm_attention
from tests.model.test_document_attention import assert_close_normwise, segments, varlen_reference

TINY_GQA = LLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=172,
                     max_position_embeddings=256, make_vocab_size_divisible_by=64)
FP32_TOL = dict(atol=1e-5, rtol=1e-4)


def with_impl(impl: str) -> LLMConfig:
    return LLMConfig(**{**TINY_GQA.__dict__, "attention_impl": impl})


def packed_rows(device="cpu"):
    """(segment_ids, position_ids) [2, 45]: 3 and 4 ragged documents, then padding; positions restart."""
    seg = segments((11, 1, 17, 16), (5, 9, 20, 8, 3)).to(device)
    new_doc = torch.ones_like(seg, dtype=torch.bool)
    new_doc[:, 1:] = seg[:, 1:] != seg[:, :-1]
    idx = torch.arange(seg.shape[1], device=device).expand_as(seg)
    starts = torch.where(new_doc, idx, 0).cummax(dim=1).values
    return seg, (idx - starts) * (seg >= 0)


def run_llm(impl, state=None, *, recompute=False, dtype=torch.float32, device="cpu", grad=True):
    """Build the 2-layer GQA LLM with `impl` (weights from `state` when given), run packed rows through
    its layers -> (hidden [S, B, H], {name: grad} incl. the input's, state_dict)."""
    torch.manual_seed(0)
    llm = build_llm(with_impl(impl), 128, params_dtype=dtype, recompute=recompute).to(device)
    if state is not None:
        llm.load_state_dict(state)  # strict: every backend has the same names
    seg, pos = packed_rows(device)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(seg.shape[1], seg.shape[0], 64, generator=g) * 0.5).to(device, dtype).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        hidden = llm_hidden_states(llm, x, pos, seg)
    grads = {}
    if grad:
        (hidden.float() * torch.randn(hidden.shape, generator=g).to(device)).sum().backward()
        grads = {"input": x.grad, **{n: p.grad for n, p in llm.named_parameters() if p.grad is not None}}
    return hidden.detach(), grads, llm.state_dict()


@pytest.fixture(scope="module")
def local(single_process_world):
    return run_llm("local")


def assert_same(actual, expected, close=lambda a, e, msg: torch.testing.assert_close(a, e, **FP32_TOL, msg=msg)):
    hidden, grads, _ = actual
    close(hidden, expected[0], "hidden")
    assert grads.keys() == expected[1].keys()
    for name in grads:
        close(grads[name], expected[1][name], name)


@pytest.mark.parametrize("recompute", [False, True], ids=["", "recompute"])
def test_sdpa_layers_match_local(local, recompute):
    assert_same(run_llm("sdpa", local[2], recompute=recompute), local)


def test_flex_layers_match_local_forward(local):
    hidden, _, _ = run_llm("flex", local[2], grad=False)
    torch.testing.assert_close(hidden, local[0], **FP32_TOL)


def test_te_backend_hands_thd_documents_to_te(local, monkeypatch):
    """transformer-engine is absent here: a stand-in for megatron's TEDotProductAttention (THD reference)
    checks the packed-sequence parameters and layout the te backend gives it."""
    from megatron.core.transformer.enums import AttnMaskType

    def te(config, layer_number, attention_type, softmax_scale, pg_collection):
        def attend(q, k, v, mask, attn_mask_type, packed_seq_params):
            p = packed_seq_params
            assert mask is None and attn_mask_type == AttnMaskType.padding_causal and p.qkv_format == "thd"
            assert p.cu_seqlens_q is p.cu_seqlens_kv and p.max_seqlen_q == p.max_seqlen_kv
            return varlen_reference(q, k, v, p.cu_seqlens_q, p.max_seqlen_q, softmax_scale).flatten(1)
        return attend

    monkeypatch.setattr(document_attention, "installed_backends", lambda: {"te": True, "flash_varlen": False})
    monkeypatch.setattr(llm_attention, "_te_attention", te)
    hidden, _, state = run_llm("te", local[2], grad=False)
    torch.testing.assert_close(hidden, local[0], **FP32_TOL)
    assert state.keys() == local[2].keys()  # TE's fp8 extra state stays out of the checkpoint


def test_checkpoint_names_are_the_same_for_every_backend(local):
    sdpa, local_llm = build_llm(with_impl("sdpa"), 128), build_llm(with_impl("local"), 128)
    assert sdpa.state_dict().keys() == local[2].keys()
    assert sdpa.sharded_state_dict().keys() == local_llm.sharded_state_dict().keys()
    assert (sdpa.attention_impl, local_llm.attention_impl) == ("sdpa", "local")


@pytest.mark.gpu
def test_flex_layers_match_local_in_bf16_on_gpu(single_process_world):
    expected = run_llm("local", dtype=torch.bfloat16, device="cuda")
    assert_same(run_llm("flex", expected[2], dtype=torch.bfloat16, device="cuda"), expected, assert_close_normwise)
