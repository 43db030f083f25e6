"""The causal resampler: causality in query order, and T5 relative-position bucketing."""
import math

import pytest
import torch

from emu_mc.config import ResamplerConfig
from emu_mc.kernels.resampler_attention import relative_position_bucket
from emu_mc.model.resampler import CausalResampler


def t5_bucket_scalar(relative_position: int, num_buckets: int, max_distance: int) -> int:
    """T5's unidirectional bucket of one relative position, written from the paper/HF formula."""
    n = max(-relative_position, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return n
    val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return min(val, num_buckets - 1)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 64)])
def test_bucketing_matches_t5_formula(num_buckets, max_distance):
    rel = torch.arange(-3 * max_distance, 40)
    got = relative_position_bucket(rel, num_buckets=num_buckets, max_distance=max_distance)
    want = torch.tensor([t5_bucket_scalar(int(r), num_buckets, max_distance) for r in rel])
    assert torch.equal(got, want), (rel[got != want], got[got != want], want[got != want])


@pytest.mark.parametrize("j", [0, 3, 7])
def test_output_i_depends_on_queries_up_to_i(j):
    torch.manual_seed(0)
    cfg = ResamplerConfig(num_queries=8, d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=64,
                          num_buckets=8, max_distance=16, dropout=0.0, attention_impl="reference")
    model = CausalResampler(cfg, visual_width=24, out_width=40).double().eval()
    visual = torch.randn(3, 10, 24, dtype=torch.float64)
    base = model(visual)
    with torch.no_grad():
        model.queries[j] += torch.randn(32, dtype=torch.float64)
    moved = model(visual)
    diff = (moved - base).abs().amax(dim=(0, 2))  # per query position
    assert diff[:j].max().item() <= 1e-12 if j > 0 else True
    assert (diff[j:] > 1e-6).all(), diff


def test_attention_probability_dropout_only_in_training():
    """T5's dropout sites, the attention probabilities included: active in train mode (repeatable under a
    seed), off in eval mode."""
    cfg = ResamplerConfig(num_queries=8, d_model=32, num_layers=1, num_heads=4, d_kv=8, d_ff=64,
                          num_buckets=8, max_distance=16, dropout=0.3, attention_impl="reference")
    torch.manual_seed(0)
    model = CausalResampler(cfg, visual_width=24, out_width=40)
    visual = torch.randn(2, 10, 24)
    calls, reference = [], model.attend
    model.attend = lambda *args, **kwargs: calls.append(kwargs["dropout_p"]) or reference(*args, **kwargs)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(model(visual))
    assert torch.equal(runs[0], runs[1]) and set(calls) == {0.3}
    calls.clear()
    model.eval()
    assert torch.equal(model(visual), model(visual)) and set(calls) == {0.0}


def test_from_scratch_init_follows_t5():
    """T5's init (HF T5PreTrainedModel._init_weights, as the release's causal former gets it), checked
    on the empirical std of each weight (+-10%); RMS norms at 1."""
    cfg = ResamplerConfig(num_queries=8, d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=256,
                          num_buckets=32, max_distance=16, dropout=0.0, attention_impl="reference")
    torch.manual_seed(0)
    model = CausalResampler(cfg, visual_width=96, out_width=40)
    expected = {"rel_bias": 64 ** -0.5, "self_attn.q.weight": (64 * 16) ** -0.5, "self_attn.k.weight": 64 ** -0.5,
                "self_attn.v.weight": 64 ** -0.5, "self_attn.o.weight": 64 ** -0.5, "cross_attn.q.weight": (64 * 16) ** -0.5,
                "cross_attn.k.weight": 64 ** -0.5, "cross_attn.v.weight": 64 ** -0.5, "wi.weight": 64 ** -0.5,
                "wo.weight": 256 ** -0.5, "queries": 0.02}
    for name, param in model.named_parameters():
        key = name.split(".", 2)[-1] if name.startswith("layers.") else name
        if key in expected:
            assert abs(param.std().item() / expected[key] - 1) < 0.1, (name, param.std().item(), expected[key])
        elif "norm" in name:
            assert torch.equal(param, torch.ones_like(param)), name
