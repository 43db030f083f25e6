"""Training-step benchmark: step time, tokens/s, images/s, TFLOP/s and MFU for one config and layout,
with the fused kernels on and off, side by side in one run.

    python benchmarks/train_bench.py                                  # CPU: tiny config, 1 process
    python benchmarks/train_bench.py --config configs/bench_1b.yaml --steps 30     # one GPU, ~1B params

Each variant is a real `emu_mc/pretrain.py` run (torchrun when --nproc > 1) into a fresh out_dir;
numbers are medians over the steps after --warmup. Prints a table and writes JSON to --out.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench_common import ROOT, device_name, save_results


VARIANTS = {
    "fused (triton attention + triton loss)": ["--model.resampler.attention_impl", "triton", "--model.loss.impl", "triton"],
    "reference (PyTorch attention + loss)": ["--model.resampler.attention_impl", "reference", "--model.loss.impl", "reference"],
}


def run_variant(config, nproc, steps, extra, out_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    cmd += [os.path.join(ROOT, "emu_mc", "pretrain.py"), "--config", config, "--train.steps", str(steps),
            "--train.out_dir", out_dir, "--train.checkpoint_every", "0", "--train.save_final", "false",
            "--train.log_every", str(steps)] + extra
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
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_bench_<device>.json); "
                                                    "the table goes next to it as .txt")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    variants = VARIANTS if cuda else {k: v for k, v in VARIANTS.items() if k.startswith("reference")}
    notes = [f"{device_name()}; {os.path.relpath(args.config, ROOT)}, {args.nproc} process(es), "
             f"median of steps {args.warmup + 1}..{args.steps}"]
    if not cuda:
        notes.append("no CUDA: the PyTorch reference path only (Triton kernels run on CPU only under the "
                     "interpreter); MFU n/a (no CPU peak). CPU numbers say nothing about a GPU.")
    print("\n".join(notes))
    results = {}
    for name, extra in variants.items():  # saved after each variant: a run cut short keeps what finished
        with tempfile.TemporaryDirectory() as out_dir:
            results[name] = summarise(run_variant(args.config, args.nproc, args.steps, extra, out_dir), args.warmup)
        table = format_table(results)
        print("\n" + table)
        save_results("train", {"config": os.path.relpath(args.config, ROOT), "nproc": args.nproc, "steps": args.steps,
                               "warmup": args.warmup, "notes": notes, "results": results}, notes, table, args.out)


def format_table(results):
    """The printed table: one line per finished variant, then the fused / reference speed-up."""
    # "data wait": the share of a step spent waiting for the loader (the loader starves training when it is large)
    header = (f"{'variant':42s} {'step s':>8s} {'data wait':>9s} {'tok/s':>10s} {'img/s':>8s} {'TFLOP/s':>8s} "
              f"{'MFU':>6s} {'loss':>7s}")
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(f"{name:42s} {r['step_time_s']:8.3f} {r['data_time_s'] / r['step_time_s']:9.1%} "
                     f"{r['tokens_per_s']:10.0f} {r['images_per_s']:8.1f} {r['tflops_per_device']:8.4f} {mfu:>6s} "
                     f"{r['final_loss']:7.4f}")
    if len(results) == 2:
        fused, ref = results.values()
        lines.append(f"speed-up fused / reference: {ref['step_time_s'] / fused['step_time_s']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
