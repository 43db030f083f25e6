"""Launch settings of the fused resampler attention, side by side on one GPU (CUDA only).

    python benchmarks/resampler_tune.py [--batch 1024] [--out PATH]

Times `resampler_attention` forward and forward+backward at the Emu resampler's shapes (bf16, H=12,
D=64, 32 queries; self: causal + T5 bias over 32 keys; cross: 257 keys, no bias) for each value of the
settings in `emu_mc.kernels.resampler_attention.LAUNCH` (forward warps; backward warps; the backward's
key block; images per backward program for the one-tile biased case), one setting varied at a time from the defaults, and
marks the fastest. The defaults in LAUNCH are what this measured best (see benchmarks/results).
"""
import argparse

import torch

from emu_mc.kernels import resampler_attention as ra

from bench_common import add_output_args, device_name, save_results, time_ms
from resampler_bench import MAX_DISTANCE, WORKLOADS, make_inputs

SWEEP = {"fwd_warps": (2, 4, 8), "bwd_warps": (4, 8), "bwd_block_n": (32, 64, 128), "group_b": (1, 2, 4, 8)}


def time_setting(inputs, workload, mode):
    """Median ms of one call of ours on inputs (q, k, v, rel_bias, dO) under the current LAUNCH."""
    q, k, v, rel_bias, do = inputs
    causal = WORKLOADS[workload]["causal"]

    def attend():
        return ra.resampler_attention(q, k, v, causal=causal, rel_bias=rel_bias, max_distance=MAX_DISTANCE)

    if mode == "fwd":
        with torch.no_grad():
            return time_ms(attend, True, 0)
    leaves = [t for t in (q, k, v, rel_bias) if t is not None]
    return time_ms(lambda: torch.autograd.grad(attend(), leaves, do), True, 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024, help="images per launch")
    add_output_args(parser, "resampler_tune")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("resampler_tune.py times compiled kernels: it needs CUDA")

    defaults = dict(ra.LAUNCH)
    rows = []
    for workload, cfg in WORKLOADS.items():
        inputs = make_inputs(args.batch, cfg["Lk"], cfg["bias"], torch.bfloat16, "cuda")
        for setting, values in SWEEP.items():
            if setting == "group_b" and not cfg["bias"]:
                continue  # only the biased one-tile backward groups images
            mode = "fwd" if setting == "fwd_warps" else "fwd+bwd"
            for value in values:
                ra.LAUNCH.update(defaults, **{setting: value})
                rows.append({"workload": workload, "setting": setting, "value": value, "mode": mode,
                             "ms": time_setting(inputs, workload, mode)})
            best = min((r for r in rows if r["workload"] == workload and r["setting"] == setting), key=lambda r: r["ms"])
            best["best"] = True
    ra.LAUNCH.update(defaults)

    header = f"{'workload':8s} {'setting':10s} {'value':>5s} {'mode':8s} {'ms':>8s}"
    lines = [header, "-" * len(header)]
    lines += [f"{r['workload']:8s} {r['setting']:10s} {r['value']:5d} {r['mode']:8s} {r['ms']:8.3f}"
              f"{'  <- fastest' if r.get('best') else ''}" for r in rows]
    table = "\n".join(lines)
    notes = [f"{device_name()}, bf16, B={args.batch}; defaults {defaults}; one setting varied at a time"]
    print("\n".join(notes) + "\n\n" + table)
    save_results("resampler_tune", {"batch": args.batch, "defaults": defaults, "rows": rows}, notes, table, args.out)


if __name__ == "__main__":
    main()
