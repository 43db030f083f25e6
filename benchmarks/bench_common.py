"""What every benchmark shares: the device's name, a median timer, and saving JSON + the printed table.

Benchmarks run as scripts (`python benchmarks/x.py`), so this module is imported from the script's
own directory. Results go to runs/bench/ (git-ignored) unless `--out PATH` names a file (or a folder,
ending in /) or `--update-results` asks for the committed benchmarks/results/.
"""
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional

MIB = 2 ** 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS_DIR = os.path.join(ROOT, "runs", "bench")  # default: outside the tracked tree
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")  # committed; written only with --update-results


def device_name() -> str:
    """The CUDA device's name, or the CPU's architecture and core count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.machine()} ({os.cpu_count()} cores)"


def add_output_args(parser, bench: str) -> None:
    """--out and --update-results (exclusive); both land in `args.out`, which save_results takes."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--out", help=f"JSON path, or a folder ending in / (default runs/bench/{bench}_bench_<device>"
                                     ".json); the table goes next to it as .txt")
    group.add_argument("--update-results", dest="out", action="store_const", const=os.path.join(RESULTS_DIR, ""),
                       help=f"write the committed benchmarks/results/{bench}_bench_<device>.json instead")


def add_kernel_bench_args(parser, bench: str, reps: int) -> None:
    """--quick, --dtype, --reps, --out and --update-results, shared by the kernel benchmarks."""
    parser.add_argument("--quick", action="store_true", help="reduced sizes (always on without CUDA)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--reps", type=int, default=reps, help="timed calls per row on CPU (CUDA: do_bench)")
    add_output_args(parser, bench)


def kernel_bench_setup(args) -> tuple:
    """(cuda, quick, device, dtype) from `add_kernel_bench_args`' flags; refuses to time interpreted kernels."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 is set: the Triton kernel would be interpreted, not benchmarked")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")]
    return cuda, args.quick or not cuda, "cuda" if cuda else "cpu", dtype


def time_ms(fn: Callable[[], object], cuda: bool, reps: int, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA (L2 flushed between calls), wall clock
    over `reps` calls on CPU after one warm-up call."""
    if cuda:
        import triton

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mib(fn, cuda):
    """Peak bytes allocated by fn() above what was allocated before it, in MiB (CUDA: the allocator's peak;
    CPU: the profiler's allocation trace)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MIB
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:  # the trace's allocation events carry the allocator's total
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0.0
    events.sort(key=lambda args: args["Ev Idx"])
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    return (max(args["Total Allocated"] for args in events) - base) / MIB


def save_results(bench: str, record: Dict, notes: List[str], table: str, out: Optional[str] = None,
                 quiet: bool = False) -> str:
    """Write `record` (plus device, versions and a UTC timestamp) as JSON and notes + table as .txt beside it.

    `out`: a JSON path (used as given), a folder ending in a path separator, or None for runs/bench/; in a
    folder the file is <bench>_bench_<device tag>.json, the tag "cpu" or the CUDA device's name.
    Returns the JSON path; `quiet` skips the line saying where it wrote (for saves after every row).
    """
    import torch

    cuda = torch.cuda.is_available()
    versions = {"torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    record = {"bench": bench, "device": device_name(), "cuda": cuda, **versions,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **record}
    tag = "".join(c if c.isalnum() else "_" for c in (torch.cuda.get_device_name() if cuda else "cpu")).strip("_")
    folder = RUNS_DIR if out is None else out if out.endswith(os.sep) else None
    if folder is not None:
        out = os.path.join(folder, f"{bench}_bench_{tag}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.splitext(out)[0] + ".txt", "w") as f:
        f.write("\n".join(notes) + "\n\n" + table + "\n")
    if not quiet:
        print(f"wrote {out} and {os.path.splitext(out)[0]}.txt")
    return out
