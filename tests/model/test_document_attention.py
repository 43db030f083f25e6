"""Packed-document attention backends against the dense-mask reference: forward and gradients on rows of
several ragged documents plus padding, grouped-query heads, padding isolation, the saved-tensor
footprint of sdpa, and which backend `auto` picks."""
import sys
import types

import pytest
import torch

from emu_mc.config import ConfigError
from emu_mc.model import document_attention as da
from emu_mc.model.document_attention import (PackedDocuments, causal_pairs, document_attention,
                                             document_attention_reference, resolve_attention_impl)

FP32_TOL = dict(atol=2e-5, rtol=1e-4)
BF16_REL_ERR = 2e-2  # |actual - expected| / |expected| (Frobenius): bf16 rounds at ~4e-3 per element


def assert_close_normwise(actual, expected, msg=""):
    err = ((actual.float() - expected.float()).norm() / expected.float().norm()).item()
    assert err < BF16_REL_ERR, f"{msg}: relative error {err:.2e} >= {BF16_REL_ERR}"


def segments(*rows):
    """rows of (document lengths..., padding) -> segment_ids [B, S] long."""
    out = []
    for *docs, pad in rows:
        out.append(sum(([i] * n for i, n in enumerate(docs)), []) + [-1] * pad)
    return torch.tensor(out)


CASES = {
    "3 docs + padding, 2 rows": segments((11, 1, 17, 8), (5, 9, 20, 3)),  # S = 37: odd, a 1-token document
    "one document, no padding": segments((37, 0)),
    "many short documents": segments((2, 3, 1, 4, 5, 6, 7, 1, 2, 6, 0)),
    "left padding (generation's prompts)": torch.tensor([[-1] * 5 + [0] * 20 + [1] * 12, [-1] * 10 + [0] * 27]),
}


def qkv(seg, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32, device="cpu", seed=0):
    """q [S, B, heads, D], k/v [S, B, kv_heads, D] leaf tensors that require grad."""
    g = torch.Generator().manual_seed(seed)
    b, s = seg.shape
    return [torch.randn(s, b, h, head_dim, generator=g).to(device, dtype).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_sdpa_matches_reference_forward_and_grads(case, kv_heads):
    seg = CASES[case]
    q, k, v = qkv(seg, kv_heads=kv_heads)
    expected = document_attention_reference(q, k, v, seg)
    actual = document_attention(q, k, v, PackedDocuments.from_segment_ids(seg, "sdpa"), "sdpa")
    torch.testing.assert_close(actual, expected, **FP32_TOL)
    for name, a, e in zip("qkv", grads(actual, (q, k, v)), grads(expected, (q, k, v))):
        torch.testing.assert_close(a, e, **FP32_TOL, msg=f"d{name}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_flex_forward_matches_reference_without_grad(case):
    """CPU FlexAttention runs eagerly and has no backward: forward under no_grad only."""
    seg = CASES[case]
    q, k, v = qkv(seg)
    with torch.no_grad():
        expected = document_attention_reference(q, k, v, seg)
        actual = document_attention(q, k, v, PackedDocuments.from_segment_ids(seg, "flex"), "flex")
    torch.testing.assert_close(actual, expected, **FP32_TOL)


def test_reference_is_not_plain_causal():
    """The cases do exercise document boundaries: plain causal attention differs from the reference."""
    seg = CASES["3 docs + padding, 2 rows"]
    q, k, v = qkv(seg)
    one_doc = torch.zeros_like(seg)
    assert not torch.allclose(document_attention_reference(q, k, v, seg), document_attention_reference(q, k, v, one_doc))


def varlen_reference(q, k, v, cu_seqlens, max_seqlen, scale):
    """What flash-attn's varlen and TE's THD attention compute: q [T, Hq, D], k/v [T, Hkv, D], causal
    inside each [cu_seqlens[i], cu_seqlens[i+1]) -> [T, Hq, D]. Stands in for them where they are absent."""
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens[-1] == q.shape[0]
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        assert end - start <= max_seqlen
        doc = lambda x: x[start:end, None]  # [L, 1, H, D]: one document as an S-first batch of one
        out[start:end] = document_attention_reference(doc(q), doc(k), doc(v), torch.zeros(1, end - start),
                                                      scale).view(end - start, *q.shape[1:])
    return out


def test_flash_varlen_feeds_cu_seqlens_of_b_major_documents(monkeypatch):
    """flash-attn is absent here: a stand-in with its varlen signature checks the THD layout and the
    cu_seqlens the backend hands it."""
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
        assert causal and torch.equal(cu_q, cu_k) and max_q == max_k
        return varlen_reference(q, k, v, cu_q, max_q, softmax_scale)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=varlen))
    seg = CASES["3 docs + padding, 2 rows"]
    q, k, v = qkv(seg)
    with torch.no_grad():
        actual = document_attention(q, k, v, PackedDocuments.from_segment_ids(seg, "flash_varlen"), "flash_varlen")
        torch.testing.assert_close(actual, document_attention_reference(q, k, v, seg), **FP32_TOL)


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_padding_and_documents_never_see_each_other(impl):
    """Changing the padding's k/v leaves every document's output alone, and changing a document's leaves
    the padding's output alone."""
    seg = CASES["3 docs + padding, 2 rows"]
    docs = PackedDocuments.from_segment_ids(seg, impl)
    q, k, v = (x.detach() for x in qkv(seg))
    pad = (seg < 0).t()[:, :, None, None]  # [S, B, 1, 1]
    with torch.no_grad():
        base = document_attention(q, k, v, docs, impl)
        noisy_pad = document_attention(q, k + 5 * pad, v + 5 * pad, docs, impl)
        noisy_docs = document_attention(q, k + 5 * ~pad, v + 5 * ~pad, docs, impl)
    real = ~pad[..., 0]  # [S, B, 1]
    torch.testing.assert_close(noisy_pad * real, base * real)
    torch.testing.assert_close(noisy_docs * ~real, base * ~real)


def saved_shapes(fn, *args):
    """Shapes of every tensor autograd saves for backward while running fn(*args)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return shapes


@pytest.mark.parametrize("rows", [((100, 200, 150, 62),), ((512, 0),)], ids=["4 docs", "one document"])
def test_sdpa_saves_no_s_by_s_tensor_for_backward(rows):
    s = 512
    seg = segments(*rows)
    q, k, v = qkv(seg, heads=2, kv_heads=1, head_dim=8)
    docs = PackedDocuments.from_segment_ids(seg, "sdpa")
    shapes = saved_shapes(lambda: document_attention(q, k, v, docs, "sdpa"))
    assert shapes and not [sh for sh in shapes if sum(d >= s for d in sh) >= 2], shapes
    # the probe does see the dense path's [B, H, S, S] probabilities
    assert any(sh[-2:] == (s, s) for sh in saved_shapes(lambda: document_attention_reference(q, k, v, seg)))


def test_causal_pairs_counts_in_document_pairs_without_padding():
    seg = segments((3, 1, 2), (4, 2))  # documents 3, 1 | 4, and padding runs of 2 that add nothing
    assert causal_pairs(seg) == (6 + 1) + 10


def test_documents_out_of_order_are_refused():
    with pytest.raises(ValueError, match="segment_ids: each row must hold its documents in order"):
        PackedDocuments.from_segment_ids(torch.tensor([[0, 0, -1, 1]]), "sdpa")


def test_auto_picks_te_then_flash_varlen_then_flex_on_cuda_and_sdpa_on_cpu(monkeypatch):
    assert resolve_attention_impl("auto", cuda=False) == "sdpa"
    for have, expected in [({"te": True, "flash_varlen": True}, "te"), ({"te": False, "flash_varlen": True}, "flash_varlen"),
                           ({"te": False, "flash_varlen": False}, "flex")]:
        monkeypatch.setattr(da, "installed_backends", lambda: have)
        assert resolve_attention_impl("auto", cuda=True) == expected


@pytest.mark.parametrize("impl, cuda, message", [
    ("te", True, "te needs transformer-engine, which is not installed here"),
    ("flash_varlen", True, "flash_varlen needs flash-attn, which is not installed here"),
    ("flex", False, "flex needs CUDA to train"),
])
def test_backends_this_machine_cannot_train_with_are_config_errors(monkeypatch, impl, cuda, message):
    monkeypatch.setattr(da, "installed_backends", lambda: {"te": False, "flash_varlen": False})
    with pytest.raises(ConfigError, match=f"model.llm.attention_impl: {message}"):
        resolve_attention_impl(impl, cuda=cuda, training=True)
    if impl == "flex":
        assert resolve_attention_impl(impl, cuda=cuda) == "flex"  # forward-only use (tests) is fine


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_flex_compiled_bf16_matches_reference_on_gpu(case):
    seg = CASES[case].cuda()
    q, k, v = qkv(seg, heads=8, kv_heads=2, head_dim=64, dtype=torch.bfloat16, device="cuda")
    ref_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    expected = document_attention_reference(*ref_inputs, seg)
    actual = document_attention(q, k, v, PackedDocuments.from_segment_ids(seg, "flex"), "flex")
    assert_close_normwise(actual, expected, "out")
    for name, a, e in zip("qkv", grads(actual, (q, k, v)), grads(expected, ref_inputs)):
        assert_close_normwise(a, e, f"d{name}")


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_rows_of_one_document_run_plain_causal_attention(impl):
    """Every row one document, no padding: sdpa and flex skip the gathers / BlockMask and run causal SDPA
    (forward and grads equal the reference, also for flex on CPU); padding or a second document does not."""
    seg = segments((29, 0), (29, 0))
    docs = PackedDocuments.from_segment_ids(seg, impl)
    assert docs.causal_only and docs.block_mask is None and not docs.buckets
    q, k, v = qkv(seg)
    actual, expected = document_attention(q, k, v, docs, impl), document_attention_reference(q, k, v, seg)
    torch.testing.assert_close(actual, expected, **FP32_TOL)
    for name, a, e in zip("qkv", grads(actual, (q, k, v)), grads(expected, (q, k, v))):
        torch.testing.assert_close(a, e, **FP32_TOL, msg=f"d{name}")
    for other in (segments((29, 0), (28, 1)), segments((29, 0), (20, 9, 0)), torch.tensor([[-1] + [0] * 28])):
        assert not PackedDocuments.from_segment_ids(other, impl).causal_only
