"""Training-step benchmark: step time, tokens/s, images/s, TFLOP/s and MFU for one config and layout,
with the fused kernels on and off, side by side in one run.

    python benchmarks/train_bench.py                                  # CPU: tiny config, 1 process
    python benchmarks/train_bench.py --config configs/bench_1b.yaml --steps 30     # one GPU, ~1B params

Each variant is a real `emu_mc/pretrain.py` run (torchrun when --nproc > 1) into a fresh out_dir;
numbers are medians over the steps after --warmup. Variants (see VARIANTS): fused, fused-local-attn
(differs from fused only in the LLM's attention: megatron's unfused `local` instead of auto's fused
packed-document backend) and reference; `--variants fused fused-local-attn` runs just the attention
comparison. Each row names the attention path that ran; a variant that fails is reported and the next
one runs. Prints a table and writes JSON to --out.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench_common import ROOT, device_name, save_results


FUSED = ["--model.resampler.attention_impl", "triton", "--model.loss.impl", "triton"]
REFERENCE = ["--model.resampler.attention_impl", "reference", "--model.loss.impl", "reference"]
# name: (overrides, model.llm.attention_impl), run in this order (fused ones on CUDA only):
#   fused            Triton resampler attention + Triton loss, LLM attention auto (the fused packed-document backend)
#   fused-local-attn the same with megatron's unfused LLM attention: the LLM attention's share of the step
#   reference        PyTorch resampler attention + loss, LLM attention local: the baseline of the speed-up column
VARIANTS = {
    "fused": (FUSED, "auto"),
    "fused-local-attn": (FUSED, "local"),
    "reference": (REFERENCE, "local"),
}


def run_variant(config, nproc, steps, extra, out_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    cmd += [os.path.join(ROOT, "emu_mc", "pretrain.py"), "--config", config, "--train.steps", str(steps),
            "--train.out_dir", out_dir, "--train.checkpoint_every", "0", "--train.log_every", str(steps)] + extra
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summarise(rows, warmup):
    timed = rows[warmup:] or rows
    med = lambda key: statistics.median(r[key] for r in timed) if timed[0].get(key) is not None else None
    keys = ("step_time_s", "data_time_s", "tokens_per_s", "images_per_s", "tflops_per_device", "mfu")
    return {k: med(k) for k in keys} | {
        "final_loss": rows[-1]["loss"], "steps_timed": len(timed)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants to run, in the order given (default: all; fused ones need CUDA)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_bench_<device>.json); "
                                                    "the table goes next to it as .txt")
    args = parser.parse_args()

    import torch

    from emu_mc.accelerators import llm_attention_path

    cuda = torch.cuda.is_available()
    variants = {name: VARIANTS[name] for name in args.variants if cuda or name == "reference"}
    notes = [f"{device_name()}; {os.path.relpath(args.config, ROOT)}, {args.nproc} process(es), "
             f"median of steps {args.warmup + 1}..{args.steps}"]
    if not cuda:
        notes.append("no CUDA: the PyTorch reference path only (Triton kernels run on CPU only under the "
                     "interpreter); MFU n/a (no CPU peak). CPU numbers say nothing about a GPU.")
    print("\n".join(notes))
    results = {}
    for name, (extra, attention) in variants.items():  # saved after each variant: a run cut short keeps what finished
        with tempfile.TemporaryDirectory() as out_dir:
            try:
                rows = run_variant(args.config, args.nproc, args.steps,
                                   extra + ["--model.llm.attention_impl", attention], out_dir)
                results[name] = summarise(rows, args.warmup)
            except subprocess.CalledProcessError as err:
                results[name] = {"error": f"pretrain exited {err.returncode} (its log is above)"}
        results[name]["llm_attention"] = llm_attention_path(attention)
        table = format_table(results)
        print("\n" + table)
        save_results("train", {"config": os.path.relpath(args.config, ROOT), "nproc": args.nproc, "steps": args.steps,
                               "warmup": args.warmup, "notes": notes, "results": results}, notes, table, args.out)


def format_table(results):
    """The printed table: one line per finished variant, its speed-up over the last (the reference), and
    the LLM attention path each ran."""
    # "data wait": the share of a step spent waiting for the loader (the loader starves training when it is large)
    header = (f"{'variant':18s} {'step s':>8s} {'data wait':>9s} {'tok/s':>10s} {'img/s':>8s} {'TFLOP/s':>8s} "
              f"{'MFU':>6s} {'loss':>7s} {'speed-up':>8s}")
    lines = [header, "-" * len(header)]
    baseline = results.get("reference", {}).get("step_time_s")
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:18s} failed: {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        speedup = f"{baseline / r['step_time_s']:7.2f}x" if baseline else f"{'-':>8s}"
        lines.append(f"{name:18s} {r['step_time_s']:8.3f} {r['data_time_s'] / r['step_time_s']:9.1%} "
                     f"{r['tokens_per_s']:10.0f} {r['images_per_s']:8.1f} {r['tflops_per_device']:8.4f} {mfu:>6s} "
                     f"{r['final_loss']:7.4f} {speedup}")
    lines.append("LLM attention: " + "; ".join(f"{name}: {r['llm_attention']}" for name, r in results.items()))
    auto, local = (results.get(name, {}).get("step_time_s") for name in ("fused", "fused-local-attn"))
    if auto and local:
        lines.append(f"LLM attention auto vs local (both fused): {local / auto:.2f}x step speed-up")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
