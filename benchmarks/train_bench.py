"""Training-step benchmark: step time, tokens/s, images/s, TFLOP/s and MFU for one config and layout,
with the fused kernels on and off, side by side in one run.

    python benchmarks/train_bench.py                                  # CPU: tiny config, 1 process
    python benchmarks/train_bench.py --config configs/bench_1b.yaml --steps 30     # one GPU, ~1B params
    python benchmarks/train_bench.py --nproc 2 --vision-layouts split,replicated \
        --parallel.tensor_parallel 2 --data.kind synthetic --data.images_per_synthetic_sample 4   # vision split vs not

Further arguments are config overrides passed to every run. Every variant reports the seconds each TP
rank of the first stage spends in the vision side per step (ViT + ln_visual + resampler, forward and
backward) and that time's share of the step; `--vision-layouts` repeats each variant per
`parallel.vision_layout` (split: each TP rank encodes its share of the images; replicated: all of them).

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

from bench_common import ROOT, RUNS_DIR, add_output_args, device_name, save_results


FUSED = ["--model.resampler.attention_impl", "triton", "--model.loss.impl", "triton"]
REFERENCE = ["--model.resampler.attention_impl", "reference", "--model.loss.impl", "reference"]
# name: overrides, run in this order (fused ones on CUDA only):
#   fused            Triton resampler attention + Triton loss, LLM attention auto (the fused packed-document backend)
#   fused-local-attn the same with megatron's unfused LLM attention: the LLM attention's share of the step
#   reference        PyTorch resampler attention + loss, LLM attention local: the baseline of the speed-up column
VARIANTS = {
    "fused": FUSED + ["--model.llm.attention_impl", "auto"],
    "fused-local-attn": FUSED + ["--model.llm.attention_impl", "local"],
    "reference": REFERENCE + ["--model.llm.attention_impl", "local"],
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
    per_rank = [statistics.median(r["vision_time_s_per_rank"][i] for r in timed)
                for i in range(len(timed[0].get("vision_time_s_per_rank", [])))]
    return {k: med(k) for k in keys} | {
        "final_loss": rows[-1]["loss"], "steps_timed": len(timed), "vision_time_s_per_rank": per_rank,
        "vision_share_per_rank": [t / med("step_time_s") for t in per_rank]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants to run, in the order given (default: all; fused ones need CUDA)")
    parser.add_argument("--profile-step", type=int, default=0,
                        help="profile this step of the first variant (torch.profiler; its table is printed and saved "
                             "beside the JSON as <name>_profile.txt)")
    add_output_args(parser, "train")
    parser.add_argument("--vision-layouts", default=None,
                        help="comma-separated parallel.vision_layout values to run each variant with (split,replicated)")
    parser.add_argument("--rounds", type=int, default=1, help="run the variants this many times, alternating; "
                                                                 "medians over the timed steps of all rounds")
    args, overrides = parser.parse_known_args()

    import torch

    from emu_mc.accelerators import llm_attention_path

    cuda = torch.cuda.is_available()
    variants = {name: VARIANTS[name] + overrides for name in args.variants if cuda or name == "reference"}
    if args.vision_layouts:
        variants = {f"{name}, vision {layout}": extra + ["--parallel.vision_layout", layout]
                    for name, extra in variants.items() for layout in args.vision_layouts.split(",")}
    notes = [f"{device_name()}; {os.path.relpath(args.config, ROOT)}, {args.nproc} process(es), "
             f"median of steps {args.warmup + 1}..{args.steps}" + (f" of {args.rounds} alternating rounds" if args.rounds > 1 else "")] + ([f"overrides: {' '.join(overrides)}"] if overrides else [])
    if not cuda:
        notes.append("no CUDA: the PyTorch reference path only (Triton kernels run on CPU only under the "
                     "interpreter); MFU n/a (no CPU peak). CPU numbers say nothing about a GPU.")
    print("\n".join(notes))
    results, timed = {}, {name: [] for name in variants}
    # saved after each variant: a run cut short keeps what finished; rounds alternate the variants, so a
    # shared machine's load changes weigh on all of them alike
    for i, (name, extra) in enumerate([item for _ in range(args.rounds) for item in variants.items()]):
        profile = args.profile_step > 0 and i == 0
        if profile:
            extra = extra + ["--train.profile_step", str(args.profile_step)]
        with tempfile.TemporaryDirectory() as out_dir:
            try:
                timed[name] += run_variant(args.config, args.nproc, args.steps, extra, out_dir)[args.warmup:]
                if profile:
                    save_profile(os.path.join(out_dir, f"profile_step{args.profile_step}_rank0.txt"), name, args.out)
                results[name] = summarise(timed[name], 0)
            except subprocess.CalledProcessError as err:
                results[name] = {"error": f"pretrain exited {err.returncode} (its log is above)"}
        results[name]["llm_attention"] = llm_attention_path(extra[extra.index("--model.llm.attention_impl") + 1])
        table = format_table(results)
        print("\n" + table)
        save_results("train", {"config": os.path.relpath(args.config, ROOT), "nproc": args.nproc, "steps": args.steps,
                               "warmup": args.warmup, "rounds": args.rounds, "overrides": overrides, "notes": notes, "results": results},
                     notes, table, args.out)


def save_profile(table_path, variant, out):
    """Print the rank-0 profile table of `variant` and copy it beside the results JSON."""
    with open(table_path) as f:
        table = f"{device_name()}; {variant}; " + f.read()
    print(table)
    folder = RUNS_DIR if out is None else out if out.endswith(os.sep) else None
    dest = os.path.join(folder, "train_bench_profile.txt") if folder else os.path.splitext(out)[0] + "_profile.txt"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with open(dest, "w") as f:
        f.write(table)
    print(f"wrote {dest}")


def format_table(results):
    """The printed table: one line per variant, its speed-up over the reference, the LLM attention path
    each ran, and the vision side's time per TP rank."""
    # "data wait": the share of a step spent waiting for the loader (the loader starves training when it is large)
    header = (f"{'variant':28s} {'step s':>8s} {'data wait':>9s} {'tok/s':>10s} {'img/s':>8s} {'TFLOP/s':>8s} "
              f"{'MFU':>6s} {'loss':>7s} {'speed-up':>8s}")
    lines = [header, "-" * len(header)]
    baseline = results.get("reference", {}).get("step_time_s")
    finished = {name: r for name, r in results.items() if "error" not in r}
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:28s} failed: {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        speedup = f"{baseline / r['step_time_s']:7.2f}x" if baseline else f"{'-':>8s}"
        lines.append(f"{name:28s} {r['step_time_s']:8.3f} {r['data_time_s'] / r['step_time_s']:9.1%} "
                     f"{r['tokens_per_s']:10.0f} {r['images_per_s']:8.1f} {r['tflops_per_device']:8.4f} {mfu:>6s} "
                     f"{r['final_loss']:7.4f} {speedup}")
    lines.append("LLM attention: " + "; ".join(f"{name}: {r['llm_attention']}" for name, r in results.items()))
    auto, local = (finished.get(name, {}).get("step_time_s") for name in ("fused", "fused-local-attn"))
    if auto and local:
        lines.append(f"LLM attention auto vs local (both fused): {local / auto:.2f}x step speed-up")
    lines += ["", "vision side per TP rank of the first stage (ViT + ln_visual + resampler, forward + backward):"]
    lines += [f"{name:28s} " + "  ".join(f"rank {i}: {t:.3f} s ({share:.0%} of the step)" for i, (t, share) in
                                         enumerate(zip(r["vision_time_s_per_rank"], r["vision_share_per_rank"])))
              for name, r in finished.items()]
    for name, split in finished.items():  # split vs replicated, per kernel variant
        replicated = finished.get(name.replace("vision split", "vision replicated"))
        if name.endswith("vision split") and replicated:
            ratios = [b / a for a, b in zip(split["vision_time_s_per_rank"], replicated["vision_time_s_per_rank"])]
            lines.append(f"{name[:-len(', vision split')]}: vision time per rank replicated / split: "
                         + ", ".join(f"{x:.2f}x" for x in ratios)
                         + f"; step time {replicated['step_time_s'] / split['step_time_s']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
