"""Resampler attention benchmark: the fused Triton kernel beside the alternatives, on the same inputs.

    python benchmarks/resampler_bench.py                 # GPU: Emu shapes, B sweep 64..1024
    python benchmarks/resampler_bench.py --quick         # reduced sizes (the default without CUDA)

Workloads (H=12, D=64, Lq=32 queries, scale 1.0 as in T5):
  self   causal self-attention over the queries with the T5 relative-position bias (Lk=32)
  cross  cross-attention to the 257 visual tokens of an image, no bias
Implementations: eager (`resampler_attention_reference`), SDPA (the dense [H, Lq, Lk] bias with -inf
for the future as attn_mask), FlexAttention (torch.compile'd; score_mod adds the bucket table entry,
causality as a block mask), flash-attn (cross only: it has no bias; only if installed), ours (Triton,
CUDA only). q, k, v are [B, H, L, D] views of [B, L, H, D] buffers, the model's layout (flash-attn reads
the buffers directly). Modes: forward, and forward+backward (grads of q, k, v and the bias table).

Reported per row: median ms; TFLOP/s of the attention matmuls (4*D per visible (query, key) pair
forward, 2.5x that backward); GB/s of the minimum traffic (read q, k, v, write o; backward reads q, k,
v, o, dO and writes dq, dk, dv), the same bytes for every implementation; % of the device's peak memory
bandwidth; max |out - eager|; speed-up of ours over that row (t_row / t_ours).
Without CUDA only eager, SDPA and flex run, at reduced sizes: the Triton kernel would only run under
the Triton interpreter there, which is an emulator, not something to time.
"""
import argparse

import torch
import torch.nn.functional as F

from emu_mc.kernels.resampler_attention import (
    relative_bias_matrix, relative_position_bucket, resampler_attention, resampler_attention_reference,
)

from bench_common import add_kernel_bench_args, device_name, kernel_bench_setup, save_results, time_ms

H, D, LQ, NUM_BUCKETS, MAX_DISTANCE = 12, 64, 32, 32, 128
MODES = ("fwd", "fwd+bwd")
WORKLOADS = {"self": dict(Lk=LQ, causal=True, bias=True), "cross": dict(Lk=257, causal=False, bias=False)}
# Peak HBM bandwidth (GB/s, vendor figures), matched by substring of torch.cuda.get_device_name(); first match wins.
PEAK_GBPS = [
    ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000), ("H200", 4800), ("B200", 8000),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864), ("A10G", 600),
    ("RTX 4090", 1008),
]


def make_inputs(B, Lk, bias, dtype, device):
    """q [B, H, LQ, D], k/v [B, H, Lk, D] (views of [B, L, H, D] buffers) in dtype, bucket table
    [NUM_BUCKETS, H] fp32 or None; all requiring grad; plus dO [B, H, LQ, D]."""
    def heads(L, std=1.0):
        return (torch.randn(B, L, H, D, device=device, dtype=dtype) * std).requires_grad_().transpose(1, 2)

    rel_bias = (torch.randn(NUM_BUCKETS, H, device=device) * 0.5).requires_grad_() if bias else None
    return heads(LQ, D ** -0.5), heads(Lk), heads(Lk), rel_bias, torch.randn(B, H, LQ, D, device=device, dtype=dtype)


def sdpa(causal, Lk):
    """F.scaled_dot_product_attention with the dense bias (and the causal -inf) as attn_mask [H, LQ, Lk]."""
    future = torch.ones(LQ, Lk, dtype=torch.bool).triu(1)

    def attend(q, k, v, rel_bias):
        mask = None
        if rel_bias is not None:
            mask = relative_bias_matrix(rel_bias, LQ, Lk, max_distance=MAX_DISTANCE).to(q.dtype)
            mask = mask.masked_fill(future.to(q.device), float("-inf")) if causal else mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=1.0)

    return attend


def flex(causal, Lk, device):
    """torch.compile'd flex_attention: score_mod adds rel_bias[bucket(kv - q), h]; causality as a block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    pos = torch.arange(max(LQ, Lk), device=device)
    buckets = relative_position_bucket(pos[None, :Lk] - pos[:LQ, None], num_buckets=NUM_BUCKETS,
                                       max_distance=MAX_DISTANCE)  # [LQ, Lk]
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, LQ, Lk,
                                   device=device) if causal else None

    def attend(q, k, v, rel_bias):
        def add_bias(score, b, h, q_idx, kv_idx):
            return score + rel_bias[buckets[q_idx, kv_idx], h].to(score.dtype)
        return compiled(q, k, v, score_mod=add_bias if rel_bias is not None else None, block_mask=block_mask,
                        scale=1.0)

    return attend


def flash_attn_cross():
    """flash_attn_func on the [B, L, H, D] buffers behind the views (cross-attention: no bias), or None."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None

    def attend(q, k, v, rel_bias):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=1.0)
        return out.transpose(1, 2)

    return attend


def implementations(workload, cuda, device):
    """{name: attend(q, k, v, rel_bias) -> [B, H, LQ, D]} for this workload and machine."""
    causal, Lk = WORKLOADS[workload]["causal"], WORKLOADS[workload]["Lk"]

    def eager(q, k, v, rel_bias):
        return resampler_attention_reference(q, k, v, causal=causal, rel_bias=rel_bias, max_distance=MAX_DISTANCE)

    impls = {"eager": eager, "sdpa": sdpa(causal, Lk), "flex": flex(causal, Lk, device)}
    flash = flash_attn_cross() if cuda and workload == "cross" else None
    if flash is not None:
        impls["flash-attn"] = flash
    if cuda:
        impls["ours"] = lambda q, k, v, rel_bias: resampler_attention(q, k, v, causal=causal, rel_bias=rel_bias,
                                                                       max_distance=MAX_DISTANCE)
    return impls


def work(B, Lk, causal, dtype, backward):
    """(FLOPs, bytes) of one call: visible (query, key) pairs x 4D, x3.5 with backward; minimum traffic:
    forward reads q, k, v and writes o; backward reads q, k, v, o, dO and writes dq, dk, dv (2x forward)."""
    pairs = sum(min(i + 1, Lk) for i in range(LQ)) if causal else LQ * Lk
    flops = 4 * B * H * D * pairs * (3.5 if backward else 1.0)
    forward_elems = 2 * B * H * LQ * D + 2 * B * H * Lk * D
    return flops, forward_elems * (3 if backward else 1) * torch.finfo(dtype).bits // 8


def measure(attend, inputs, want, mode, cuda, reps):
    """{ms, max_err} of attend on inputs (q, k, v, rel_bias, dO) in mode "fwd" (on detached inputs, as in
    inference) or "fwd+bwd"."""
    q, k, v, rel_bias, do = inputs
    leaves = [t for t in (q, k, v, rel_bias) if t is not None]
    detached = [t.detach() if t is not None else None for t in (q, k, v, rel_bias)]
    with torch.no_grad():
        err = (attend(*detached).float() - want).abs().max().item()
        if mode == "fwd":
            return {"ms": time_ms(lambda: attend(*detached), cuda, reps), "max_err": err}
    return {"ms": time_ms(lambda: torch.autograd.grad(attend(q, k, v, rel_bias), leaves, do), cuda, reps),
            "max_err": err}


def bench_case(workload, B, impls, dtype, cuda, device, reps, peak_gbps):
    """Rows for one (workload, B): every implementation, forward and forward+backward."""
    cfg = WORKLOADS[workload]
    inputs = make_inputs(B, cfg["Lk"], cfg["bias"], dtype, device)
    with torch.no_grad():
        want = impls["eager"](*inputs[:4]).float()
    rows = []
    for mode in MODES:
        flops, nbytes = work(B, cfg["Lk"], cfg["causal"], dtype, backward=mode != "fwd")
        for name, attend in impls.items():
            row = {"workload": workload, "B": B, "mode": mode, "impl": name}
            try:
                row |= measure(attend, inputs, want, mode, cuda, reps)
            except Exception as exc:  # an alternative that cannot run here is reported, not fatal
                row["skipped"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
                rows.append(row)
                continue
            gbps = nbytes / row["ms"] / 1e6
            row |= {"tflops": flops / row["ms"] / 1e9, "gbps": gbps,
                    "pct_peak_bw": 100 * gbps / peak_gbps if peak_gbps else None}
            rows.append(row)
        timed = {r["impl"]: r["ms"] for r in rows if r["mode"] == mode and "ms" in r}
        for r in rows:
            if r["mode"] == mode and "ms" in r:
                r["speedup_vs_eager"] = timed["eager"] / r["ms"]
                r["ours_speedup"] = r["ms"] / timed["ours"] if "ours" in timed else None
    return rows


def format_table(rows):
    header = (f"{'workload':8s} {'B':>5s} {'mode':8s} {'impl':10s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>8s} "
              f"{'%peakBW':>7s} {'max err':>8s} {'x eager':>7s} {'ours x':>7s}")
    lines = [header, "-" * len(header)]
    fmt = lambda value, spec: "-" if value is None else format(value, spec)
    for r in rows:
        start = f"{r['workload']:8s} {r['B']:5d} {r['mode']:8s} {r['impl']:10s}"
        if "skipped" in r:
            lines.append(f"{start} skipped: {r['skipped']}")
            continue
        lines.append(f"{start} {r['ms']:9.3f} {r['tflops']:8.3f} {r['gbps']:8.1f} {fmt(r['pct_peak_bw'], '7.1f')} "
                     f"{r['max_err']:8.1e} {r['speedup_vs_eager']:7.2f} {fmt(r['ours_speedup'], '7.2f')}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", help="images per launch (default 64 128 256 512 1024; "
                                                             "quick: 4 16 64)")
    add_kernel_bench_args(parser, "resampler", reps=10)
    args = parser.parse_args()

    cuda, quick, device, dtype = kernel_bench_setup(args)
    name = device_name()
    batches = args.batch or ([4, 16, 64] if quick else [64, 128, 256, 512, 1024])
    peak_gbps = next((gbps for key, gbps in PEAK_GBPS if key in name), None) if cuda else None
    notes = [f"{name}, {dtype}, H={H} D={D} Lq={LQ}, B sweep {batches}"]
    if not cuda:
        notes.append("NO CUDA: quick mode, PyTorch paths only (eager, SDPA, flex if it compiles here); the Triton "
                     "kernel is not timed (it would run under the interpreter). CPU numbers say nothing about a GPU.")
    elif peak_gbps is None:
        notes.append(f"peak bandwidth of '{name}' unknown: no % of peak")
    print("\n".join(notes))

    rows = []
    for workload in WORKLOADS:
        impls = implementations(workload, cuda, device)
        for B in batches:
            rows += bench_case(workload, B, impls, dtype, cuda, device, args.reps, peak_gbps)
            print(format_table([r for r in rows if r["workload"] == workload and r["B"] == B]).split("\n", 2)[-1])
    table = format_table(rows)
    print("\n" + table)

    save_results("resampler", {"quick": quick, "dtype": str(dtype), "peak_gbps": peak_gbps,
                               "shapes": {"H": H, "D": D, "Lq": LQ, "workloads": WORKLOADS, "batches": batches},
                               "notes": notes, "rows": rows}, notes, table, args.out)


if __name__ == "__main__":
    main()
