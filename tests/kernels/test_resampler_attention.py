"""Fused resampler attention (Triton) against the PyTorch reference: forward and the gradients of q, k,
v and the T5 bucket table. Without CUDA the kernels run under the Triton interpreter (see conftest), one
program at a time, so the shape grid is a covering set, not the full product: every pair of values of
any two axes appears in some case (checked by `test_shape_grid_covers_every_pair`); plus the two Emu
shapes, every (Lq, Lk, causal) with bias, targeted edge cases, and an sm_90 compile of the Emu launches.
"""
import dataclasses
import itertools

import pytest
import torch
from triton.runtime.errors import OutOfResources

import emu_mc.kernels.resampler_attention as ra
from emu_mc.kernels.resampler_attention import resampler_attention, resampler_attention_reference
from emu_mc.model.resampler import CausalResampler
from tests.kernels.compile_sm90 import H100_SHARED_MEMORY, compiled_shared_memory, ptxas_available

# (atol, rtol) per input dtype, against the reference run in fp32 on the same (rounded) inputs; atol is
# relative to the largest entry of each compared tensor when that exceeds 1 (rounding errors of a dot
# product scale with its operands, e.g. dq = scale * dS K at T5's scale 1.0).
# fp32: the kernel does exact-IEEE fp32 dots with fp32 softmax statistics, so only summation order
# differs. fp16/bf16: P and dS are rounded to the input dtype before the PV / dS K / dS^T Q dots, as in
# flash-attention; the bias-table gradient is an fp32 sum in both and is held to the same bound. On the
# interpreter the worst error over SHAPE_GRID and EMU_SHAPES was 11% (fp32) and 18% (fp16) of these, 34% for
# fp16 over 40 random dO on the Emu self-attention shape; bf16 is set by analogy (checked on a GPU only).
TOLERANCES = {
    torch.float32: (5e-6, 5e-5),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (5e-2, 5e-2),
}

AXES = {
    "Lq": [1, 7, 32, 33],
    "Lk": [32, 257, 300],
    "D": [32, 64, 88],
    "H": [1, 12],
    "causal": [False, True],
    "bias": [False, True],
    "dtype": [torch.float32, torch.float16],
}
# (B, Lq, Lk, D, H, causal, bias, dtype); B is kept small, since the interpreter runs programs one by one.
SHAPE_GRID = [
    (2, 1, 32, 32, 1, False, True, torch.float16),
    (2, 1, 257, 64, 1, True, False, torch.float32),
    (1, 1, 300, 88, 12, False, False, torch.float32),
    (2, 7, 32, 88, 1, False, False, torch.float32),
    (2, 7, 257, 32, 1, True, False, torch.float16),
    (1, 7, 300, 64, 12, True, True, torch.float16),
    (2, 32, 32, 64, 1, False, True, torch.float32),
    (1, 32, 257, 88, 12, False, True, torch.float32),
    (2, 32, 300, 32, 1, True, False, torch.float16),
    (1, 33, 32, 88, 12, True, True, torch.float16),
    (1, 33, 257, 32, 12, False, True, torch.float32),
    (2, 33, 300, 64, 1, True, False, torch.float32),
]
# Emu's two resampler attentions: causal self-attention with bias over 32 queries, cross-attention to
# 257 visual tokens without bias (B is the number of images in the micro-batch).
EMU_SHAPES = [
    (2, 32, 32, 64, 12, True, True),
    (2, 32, 257, 64, 12, False, False),
]


def make_inputs(B, H, Lq, Lk, D, dtype, device, *, bias, num_buckets=32, bias_dtype=torch.float32, seed=0):
    """q [B, H, Lq, D], k/v [B, H, Lk, D] in `dtype`, bucket table [num_buckets, H] in `bias_dtype` (or
    None); all leaves requiring grad."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape, dtype=dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    rel_bias = leaf(num_buckets, H, dtype=bias_dtype) if bias else None
    return leaf(B, H, Lq, D), leaf(B, H, Lk, D), leaf(B, H, Lk, D), rel_bias


def run_with_grads(attention, q, k, v, rel_bias, do, **kwargs):
    """Output and the grads of (q, k, v[, rel_bias]) for the upstream gradient `do`."""
    out = attention(q, k, v, rel_bias=rel_bias, **kwargs)
    leaves = [t for t in (q, k, v, rel_bias) if t is not None]
    return out, torch.autograd.grad(out, leaves, do)


def fp32_reference(q, k, v, rel_bias, do, **kwargs):
    """The reference on fp32 copies of the same inputs: output and grads, all fp32."""
    leaves = [t.detach().float().requires_grad_() if t is not None else None for t in (q, k, v, rel_bias)]
    return run_with_grads(resampler_attention_reference, *leaves, do.float(), **kwargs)


def assert_matches_reference(q, k, v, rel_bias, tol, *, do=None, dropout_mask=None, **kwargs):
    """Kernel vs fp32 reference, forward and every gradient, each held to tol = (atol, rtol) (see
    TOLERANCES) and named on failure. `do` defaults to a (seeded) random upstream gradient;
    `dropout_mask` goes to the reference only."""
    atol, rtol = tol
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q) if do is None else do
    out, grads = run_with_grads(resampler_attention, q, k, v, rel_bias, do, **kwargs)
    want_out, want_grads = fp32_reference(q, k, v, rel_bias, do, dropout_mask=dropout_mask, **kwargs)
    assert out.dtype == q.dtype and out.shape == q.shape
    names = ["out", "dq", "dk", "dv", "dbias"]
    for name, got, want in zip(names, (out, *grads), (want_out, *want_grads)):
        torch.testing.assert_close(got.float(), want, atol=atol * max(1.0, want.abs().max().item()), rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def case_id(case) -> str:
    B, Lq, Lk, D, H, causal, bias, *dtype = case
    tags = ["causal" if causal else "full", "bias" if bias else "nobias"] + [str(d).split(".")[-1] for d in dtype]
    return f"B{B}-Lq{Lq}-Lk{Lk}-D{D}-H{H}-" + "-".join(tags)


def test_shape_grid_covers_every_pair():
    """Every value of every axis, and every pair of values of any two axes, appears in SHAPE_GRID."""
    names = list(AXES)
    seen = {name: [] for name in names}
    for _, *values in SHAPE_GRID:
        for name, value in zip(names, values):
            seen[name].append(value)
    for a, b in itertools.combinations(names, 2):
        missing = set(itertools.product(AXES[a], AXES[b])) - set(zip(seen[a], seen[b]))
        assert not missing, f"{a} x {b} never tested: {missing}"


@pytest.mark.parametrize("case", SHAPE_GRID, ids=case_id)
def test_matches_reference(case, device):
    B, Lq, Lk, D, H, causal, bias, dtype = case
    q, k, v, rel_bias = make_inputs(B, H, Lq, Lk, D, dtype, device, bias=bias)
    assert_matches_reference(q, k, v, rel_bias, TOLERANCES[dtype], causal=causal, scale=D ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", EMU_SHAPES, ids=case_id)
def test_emu_shapes(case, dtype, device):
    """T5 scale 1.0, inputs of T5-like magnitude (scores O(1))."""
    B, Lq, Lk, D, H, causal, bias = case
    q, k, v, rel_bias = make_inputs(B, H, Lq, Lk, D, dtype, device, bias=bias)
    with torch.no_grad():
        q.mul_(D ** -0.5)
    assert_matches_reference(q, k, v, rel_bias, TOLERANCES[dtype], causal=causal, scale=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("case", EMU_SHAPES + [(2, 33, 300, 88, 12, True, True)], ids=case_id)
def test_bf16_on_gpu(case, device):
    """bf16 only on a GPU: the Triton interpreter computes bf16 wrongly on CPU."""
    B, Lq, Lk, D, H, causal, bias = case
    q, k, v, rel_bias = make_inputs(B, H, Lq, Lk, D, torch.bfloat16, device, bias=bias)
    assert_matches_reference(q, k, v, rel_bias, TOLERANCES[torch.bfloat16], causal=causal, scale=D ** -0.5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Lk", AXES["Lk"])
@pytest.mark.parametrize("Lq", AXES["Lq"] + [64, 65])
def test_block_boundaries(Lq, Lk, causal, device):
    """Every (Lq, Lk, causal) of the grid, with bias, plus Lq across the 64-row query block: the causal
    loop bounds, masked tails and the dBias diagonals all depend on these jointly."""
    q, k, v, rel_bias = make_inputs(1, 1, Lq, Lk, 32, torch.float32, device, bias=True)
    assert_matches_reference(q, k, v, rel_bias, TOLERANCES[torch.float32], causal=causal, scale=32 ** -0.5)


@pytest.mark.parametrize(
    "B,Lq,Lk,H,causal,num_buckets,max_distance",
    [
        (1, 40, 24, 2, True, 32, 128),   # Lq > Lk, causal: rows past Lk see every key
        (1, 1, 1, 1, True, 32, 128),     # one query, one key
        (1, 100, 70, 2, True, 32, 128),  # Lq > 64: several query blocks, dQ through the fp32 buffer
        (1, 130, 257, 1, False, 32, 128),
        (3, 9, 41, 2, True, 12, 20),     # several images in one launch; 12 buckets (padded to 16)
        (2, 20, 200, 1, True, 8, 16),    # small max_distance: many keys in the last bucket
        (5, 32, 32, 2, True, 32, 128),   # one tile: images grouped 4 per backward program, the last group short
        (9, 7, 5, 3, False, 32, 128),    # one tile, not causal: three groups, the last holding one image
    ],
)
def test_edge_shapes(B, Lq, Lk, H, causal, num_buckets, max_distance, device):
    q, k, v, rel_bias = make_inputs(B, H, Lq, Lk, 32, torch.float32, device, bias=True, num_buckets=num_buckets)
    assert_matches_reference(q, k, v, rel_bias, TOLERANCES[torch.float32], causal=causal, scale=32 ** -0.5,
                             max_distance=max_distance)


@pytest.mark.parametrize(
    "B,Lq,Lk,H,causal,bias",
    [
        (5, 32, 32, 2, True, True),    # the resampler's self-attention: one tile, images grouped in backward
        (2, 32, 45, 3, False, False),  # cross-attention, Lk past one key block
        (1, 70, 40, 1, True, True),    # several query blocks: dQ through the fp32 buffer
    ],
)
def test_dropout_matches_reference_with_the_kernels_mask(B, Lq, Lk, H, causal, bias, device):
    p, seed = 0.25, 1234
    q, k, v, rel_bias = make_inputs(B, H, Lq, Lk, 32, torch.float32, device, bias=bias)
    mask = ra.resampler_dropout_mask(seed, B, H, Lq, Lk, p, device)
    assert 0 < mask.float().mean() < 1
    assert_matches_reference(q, k, v, rel_bias, TOLERANCES[torch.float32], causal=causal, scale=32 ** -0.5,
                             dropout_p=p, seed=seed, dropout_mask=mask)


def test_dropout_mask_keep_rate_and_determinism(device):
    B, H, Lq, Lk, p = 4, 3, 32, 257, 0.1
    mask = ra.resampler_dropout_mask(7, B, H, Lq, Lk, p, device)
    n = mask.numel()
    keep = mask.float().mean().item()
    assert abs(keep - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5  # within 4 standard deviations
    assert torch.equal(mask, ra.resampler_dropout_mask(7, B, H, Lq, Lk, p, device))
    assert not torch.equal(mask, ra.resampler_dropout_mask(8, B, H, Lq, Lk, p, device))
    # every (image, head) gets its own mask, not one repeated
    assert not torch.equal(mask[0, 0], mask[1, 0]) and not torch.equal(mask[0, 0], mask[0, 1])


def test_dropout_seed_drawn_from_torch_generator(device):
    """Without a seed the kernel draws one from torch's CPU generator: torch.manual_seed repeats it."""
    q, k, v, _ = make_inputs(1, 2, 8, 8, 16, torch.float32, device, bias=False)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(resampler_attention(q, k, v, causal=True, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], resampler_attention(q, k, v, causal=True, dropout_p=0.5))


def test_strided_layouts(device):
    """q, k, v as [B, L, H, D] buffers seen through .transpose(1, 2) (the model's layout), a bucket table
    stored transposed, and a stride-0 upstream gradient (from out.sum())."""
    B, H, Lq, Lk, D = 2, 3, 7, 45, 32
    gen = torch.Generator().manual_seed(1)

    def blhd(L):
        return torch.randn(B, L, H, D, generator=gen).to(device).transpose(1, 2).requires_grad_()

    q, k, v = blhd(Lq), blhd(Lk), blhd(Lk)
    rel_bias = torch.randn(H, 32, generator=gen).to(device).t().requires_grad_()
    assert not q.is_contiguous() and not rel_bias.is_contiguous()
    ones = torch.ones(1, device=device).expand(B, H, Lq, D)
    assert_matches_reference(q, k, v, rel_bias, TOLERANCES[torch.float32], causal=True, do=ones)
    out = resampler_attention(q, k, v, causal=True, rel_bias=rel_bias)
    assert out.stride() == q.stride()


def test_fp32_grads_match_fp64_reference_and_reference_passes_gradcheck(device):
    """The kernel has no fp64 path: gradcheck the reference in fp64, then hold the kernel's fp32 grads to
    the fp64 reference grads."""
    q, k, v, rel_bias = make_inputs(1, 2, 5, 9, 8, torch.float64, "cpu", bias=True, num_buckets=8,
                                   bias_dtype=torch.float64)

    def reference(q, k, v, rel_bias):
        return resampler_attention_reference(q, k, v, causal=True, rel_bias=rel_bias, max_distance=16)

    assert torch.autograd.gradcheck(reference, (q, k, v, rel_bias))
    do = torch.randn(q.shape, dtype=torch.float64)
    _, want = run_with_grads(resampler_attention_reference, q, k, v, rel_bias, do, causal=True, max_distance=16)
    leaves = [t.detach().to(device, torch.float32).requires_grad_() for t in (q, k, v, rel_bias)]
    _, got = run_with_grads(resampler_attention, *leaves, do.to(device, torch.float32), causal=True, max_distance=16)
    for name, g, w in zip(["dq", "dk", "dv", "dbias"], got, want):
        torch.testing.assert_close(g.double().cpu(), w, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "q_shape,k_shape,dtype,bias_shape,max_distance,match",
    [
        ((2, 3, 4), (2, 3, 4), torch.float32, None, 128, "expected q"),
        ((1, 2, 4, 8), (1, 2, 5, 16), torch.float32, None, 128, "expected q"),
        ((1, 2, 4, 8), (1, 3, 5, 8), torch.float32, None, 128, "expected q"),
        ((1, 2, 4, 8), (1, 2, 5, 8), torch.float64, None, 128, "fp16/bf16/fp32"),
        ((1, 2, 0, 8), (1, 2, 5, 8), torch.float32, None, 128, "Lq >= 1"),
        ((1, 2, 4, 8), (1, 2, 0, 8), torch.float32, None, 128, "Lk >= 1"),
        ((1, 1, 4, 320), (1, 1, 5, 320), torch.float32, None, 128, "D <= 256"),
        ((1, 2, 4, 8), (1, 2, 5, 8), torch.float32, (32, 3), 128, "rel_bias must be"),
        ((1, 2, 4, 8), (1, 2, 5, 8), torch.float32, (32,), 128, "rel_bias must be"),
        ((1, 2, 4, 8), (1, 2, 5, 8), torch.float32, (32, 2), 16, "max_distance"),
    ],
)
def test_rejects_bad_inputs(q_shape, k_shape, dtype, bias_shape, max_distance, match, device):
    q = torch.zeros(q_shape, dtype=dtype, device=device)
    k = torch.zeros(k_shape, dtype=dtype, device=device)
    rel_bias = torch.zeros(bias_shape, device=device) if bias_shape else None
    with pytest.raises(ValueError, match=match):
        resampler_attention(q, k, k, causal=True, rel_bias=rel_bias, max_distance=max_distance)


@pytest.mark.parametrize("dropout_p", [-0.1, 1.0])
def test_rejects_bad_dropout(dropout_p, device):
    q = torch.zeros(1, 2, 4, 8, device=device)
    with pytest.raises(ValueError, match="dropout_p"):
        resampler_attention(q, q, q, causal=False, dropout_p=dropout_p)


def test_rejects_mixed_dtypes(device):
    q = torch.zeros(1, 2, 4, 8, device=device)
    with pytest.raises(ValueError, match="must share"):
        resampler_attention(q, q.half(), q.half(), causal=False)


def test_model_resampler_triton_matches_reference(tiny_cfg, device):
    """The tiny model's resampler with attention_impl='triton' vs 'reference', same weights: output and
    every parameter's gradient. Gradients reach 1e2 (RMSNorm over 0.02-scale queries), so the absolute
    tolerance is relative to each gradient's largest entry: fp32 reorderings, not bugs, are what it allows."""
    cfg = tiny_cfg.model
    models = {}
    for impl in ("reference", "triton"):
        torch.manual_seed(0)
        rcfg = dataclasses.replace(cfg.resampler, attention_impl=impl)
        models[impl] = CausalResampler(rcfg, cfg.vision.width, cfg.llm.hidden_size).to(device)
    assert models["triton"].attend is resampler_attention
    visual = torch.randn(3, 1 + (cfg.vision.image_size // cfg.vision.patch_size) ** 2, cfg.vision.width,
                         generator=torch.Generator().manual_seed(2)).to(device)
    upstream = torch.randn(3, cfg.resampler.num_queries, cfg.llm.hidden_size,
                           generator=torch.Generator().manual_seed(3))
    outs = {}
    for impl, model in models.items():
        outs[impl] = model(visual)
        outs[impl].backward(upstream.to(device))
    torch.testing.assert_close(outs["triton"], outs["reference"], atol=1e-5, rtol=1e-4)
    ref_params = dict(models["reference"].named_parameters())
    for name, param in models["triton"].named_parameters():
        want = ref_params[name].grad
        torch.testing.assert_close(param.grad, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


def test_launch_retries_unpipelined_when_out_of_shared_memory():
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                calls.append(meta)
                if "num_stages" not in meta:
                    raise OutOfResources(246272, 232448, "shared memory")
            return launch

    ra._launch(Kernel(), (1,), 7, num_warps=8)
    assert calls == [{"num_warps": 8}, {"num_warps": 8, "num_stages": 1}]


@pytest.mark.skipif(not ptxas_available(), reason="triton wheel without the bundled ptxas")
def test_emu_shapes_compile_for_sm90_within_shared_memory():
    """Without a GPU, Triton still compiles for one: the kernels as the launchers configure them for the
    Emu shapes (bf16) must compile for sm_90 and fit H100's 227 KB of shared memory at full pipelining."""
    compiled = compiled_shared_memory("resampler_attention", EMU_SHAPES)
    assert len(compiled) == 2 * len(EMU_SHAPES)
    for name, shared in compiled:
        assert shared <= H100_SHARED_MEMORY, f"{name} needs {shared} bytes of shared memory"
