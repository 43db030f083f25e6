"""Mixed loss benchmark: the fused Triton CE + regression loss beside the alternatives, on the same inputs.

    python benchmarks/loss_bench.py               # GPU: N in 4k 16k 64k rows x V in 32000 4000, H = E = 5120, bf16
    python benchmarks/loss_bench.py --rows 4096 16384 --vocab 32000
    python benchmarks/loss_bench.py --quick       # tiny sizes (the default without CUDA)

Workload: hidden [N, H] -> CE of hidden @ lm_weight[V, H].T over the text rows (1/8 of the rows ignored)
plus MSE of hidden[reg_index] @ reg_head_weight[E, H].T against reg_targets over R = N / 4 regression rows,
forward + backward (gradients of hidden, lm_weight and reg_head_weight). V = 4000 is Emu-14B's vocabulary
shard at TP = 8. Results are saved after every (V, N) case, so a run cut short keeps what it measured.
Implementations:
  eager    logits in the input dtype, F.cross_entropy in fp32, F.mse_loss (what a model does by default)
  compile  torch.compile of eager
  liger    Liger-Kernel's fused linear cross-entropy + eager MSE (only if liger_kernel is installed)
  cce      Cut Cross-Entropy's linear_cross_entropy + eager MSE (only if cut_cross_entropy is installed)
  ours     emu_mc.kernels.mixed_loss.mixed_ce_regression_loss over the text rows, as the model calls it
           (text_index = the rows with a target, found once outside the timed calls: the training loop
           finds them on the host and they arrive with the batch; CUDA only)
  ours_all the same op over all N rows (no text_index: no host sync at all)
  ours_<M>m `ours` with M MiB logit chunks instead of the op's default (--chunk-mib M ...: the tuning knob)
  ours_graph `ours` captured once in a CUDA graph and replayed: the GPU time without the host's launches
           (ours - ours_graph is what the host adds; its peak is the graph's memory pool; CUDA only)
Reported per row: median ms of forward+backward; peak memory above the inputs (MiB: logits, gradients and
workspaces; CUDA allocator peak, on CPU the profiler's allocation trace); |total - eager total|; time
and memory relative to eager and to ours (row / ours: above 1 means ours is faster or smaller).
Without CUDA only eager and compile run, at tiny sizes: the Triton kernel would run under the Triton
interpreter there, an emulator, which is not something to time.
"""
import argparse
import os

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList

from emu_mc.kernels import mixed_loss
from emu_mc.kernels.mixed_loss import mixed_ce_regression_loss

from bench_common import add_kernel_bench_args, device_name, kernel_bench_setup, peak_mib, save_results, time_ms

IGNORE = -100


def make_inputs(N, V, H, dtype, device):
    """Leaves hidden [N, H], lm_weight [V, H], reg_head_weight [H, H] (requiring grad); targets [N] with
    1/8 ignored, reg_index [N / 4], reg_targets [N / 4, H]."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    hidden = randn(N, H).requires_grad_()
    lm_weight = randn(V, H, std=H ** -0.5).requires_grad_()
    reg_head_weight = randn(H, H, std=H ** -0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen, device=device)
    targets[torch.rand(N, generator=gen, device=device) < 1 / 8] = IGNORE
    reg_index = torch.randperm(N, generator=gen, device=device)[:N // 4]
    return hidden, lm_weight, targets, reg_head_weight, reg_index, randn(N // 4, H)


def mse(hidden, reg_head_weight, reg_index, reg_targets):
    return F.mse_loss((hidden[reg_index] @ reg_head_weight.t()).float(), reg_targets.float())


def eager(hidden, lm_weight, targets, reg_head_weight, reg_index, reg_targets):
    logits = (hidden @ lm_weight.t()).float()  # [N, V]
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE)
    return ce + mse(hidden, reg_head_weight, reg_index, reg_targets)


def liger():
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    ce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
    return lambda h, w, t, rw, ri, rt: ce(w, h, t) + mse(h, rw, ri, rt)


def cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w, t, rw, ri, rt: (linear_cross_entropy(h, w, t, ignore_index=IGNORE, reduction="mean")
                                        + mse(h, rw, ri, rt))


def with_chunk_mib(loss, mib):
    """loss, run with `mib` MiB logit chunks in the fused op."""
    def run(*inputs):
        default, mixed_loss._CHUNK_BYTES_CUDA = mixed_loss._CHUNK_BYTES_CUDA, mib * 2 ** 20
        try:
            return loss(*inputs)
        finally:
            mixed_loss._CHUNK_BYTES_CUDA = default
    return run


_TEXT_ROWS = [None, None]  # (targets, its text rows): one targets tensor at a time, held so its id stays its own


def text_rows_of(targets):
    """[T] long: the rows of `targets` with a text target, found once per targets tensor."""
    if _TEXT_ROWS[0] is not targets:
        _TEXT_ROWS[:] = [targets, (targets != IGNORE).nonzero().squeeze(1)]
    return _TEXT_ROWS[1]


def implementations(cuda, chunk_mibs=()):
    """({name: loss(hidden, lm_weight, targets, reg_head_weight, reg_index, reg_targets) -> total},
    {name: why it is not run})."""
    impls = {"eager": eager, "compile": torch.compile(eager, dynamic=False)}
    missing = {}
    for name, factory in (("liger", liger), ("cce", cce)):
        try:
            impls[name] = factory()
        except ImportError as exc:
            missing[name] = f"not installed ({exc.name})"
    if cuda:
        impls["ours"] = lambda h, w, t, *rest: mixed_ce_regression_loss(
            h, w, t, *rest, ignore_index=IGNORE, text_index=text_rows_of(t))[0]
        impls["ours_all"] = lambda *inputs: mixed_ce_regression_loss(*inputs, ignore_index=IGNORE)[0]
        impls |= {f"ours_{mib}m": with_chunk_mib(impls["ours"], mib) for mib in chunk_mibs}
    else:
        missing["ours"] = missing["ours_all"] = "no CUDA (the Triton interpreter is an emulator: not timed)"
    return impls, missing


def fwd_bwd(loss, inputs):
    """Forward + backward; returns the (detached) total."""
    hidden, lm_weight, _, reg_head_weight, _, _ = inputs
    total = loss(*inputs)
    torch.autograd.grad(total, (hidden, lm_weight, reg_head_weight))
    return total.detach()


def graphed(loss, inputs):
    """(replay() -> total: one forward+backward of `loss` on `inputs`, captured once in a CUDA graph;
    MiB the capture allocated, the graph's memory pool)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        fwd_bwd(loss, inputs)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = fwd_bwd(loss, inputs)
    pool_mib = (torch.cuda.max_memory_allocated() - base) / 2 ** 20

    def replay():
        graph.replay()
        return total
    return replay, pool_mib


def measure(run, want, cuda, reps, peak=None):
    """{"ms", "peak_mib", "abs_err"} of run() -> total (0-dim tensor), the first call also its warm-up;
    `peak`: the MiB to report instead of measuring run's (a graph allocated everything at capture)."""
    err = abs(run().item() - want)
    # ~10 timed calls at N = 16384 (2 at the former 50 ms spread eager 30.5-31.7 ms over H100 runs)
    return {"ms": time_ms(run, cuda, reps, warmup_ms=25, rep_ms=250),
            "peak_mib": peak_mib(run, cuda) if peak is None else peak, "abs_err": err}


def runners(impls, inputs, cuda):
    """(name, setup() -> (run() -> total, peak MiB or None to measure run's)) per row of the case."""
    for name, loss in impls.items():
        yield name, lambda loss=loss: ((lambda: fwd_bwd(loss, inputs)), None)
    if cuda and "ours" in impls:
        yield "ours_graph", lambda: graphed(impls["ours"], inputs)


def bench_case(N, V, H, impls, dtype, cuda, device, reps):
    """One row per implementation for N rows."""
    inputs = make_inputs(N, V, H, dtype, device)
    want = fwd_bwd(eager, inputs).item()
    rows = []
    for name, setup in runners(impls, inputs, cuda):
        row = {"N": N, "V": V, "H": H, "impl": name}
        try:
            run, peak = setup()
            row |= measure(run, want, cuda, reps, peak)
        except Exception as exc:  # an alternative that cannot run here (e.g. out of memory) is reported
            if cuda:
                torch.cuda.empty_cache()
            row["skipped"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
        rows.append(row)
    done = {r["impl"]: r for r in rows if "ms" in r}
    for r in done.values():
        for ref in ("eager", "ours"):
            if ref in done:
                r[f"time_vs_{ref}"] = r["ms"] / done[ref]["ms"]
                r[f"mem_vs_{ref}"] = r["peak_mib"] / done[ref]["peak_mib"]
    return rows


def profile_tables(loss, inputs, trace_path=None, top=15):
    """torch.profiler's tables of one warmed-up forward+backward of `loss`: the `top` CUDA kernels by
    total device time, then the `top` aten ops by input shapes (which GEMM shape runs slowly); with
    `trace_path`, also its Chrome trace there (host gaps between the kernels)."""
    fwd_bwd(loss, inputs)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        fwd_bwd(loss, inputs)
        torch.cuda.synchronize()
    if trace_path:
        prof.export_chrome_trace(trace_path)
    kernels = EventList([e for e in prof.key_averages() if e.device_type == DeviceType.CUDA])
    ops = EventList([e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")
                     and e.device_time_total > 0])
    return "\n".join(events.table(sort_by=key, row_limit=top, max_name_column_width=70,
                                  max_shapes_column_width=90)
                     for events, key in ((kernels, "self_device_time_total"), (ops, "device_time_total")))


def format_table(rows):
    header = (f"{'V':>6s} {'N':>6s} {'impl':10s} {'ms':>10s} {'peak MiB':>10s} {'|err|':>8s} {'t/eager':>8s} {'m/eager':>8s} "
              f"{'t/ours':>7s} {'m/ours':>7s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        start = f"{r['V']:6d} {r['N']:6d} {r['impl']:10s}"
        if "skipped" in r:
            lines.append(f"{start} skipped: {r['skipped']}")
            continue
        vs_ours = " ".join(f"{r[k]:7.2f}" if k in r else f"{'-':>7s}" for k in ("time_vs_ours", "mem_vs_ours"))
        lines.append(f"{start} {r['ms']:10.2f} {r['peak_mib']:10.1f} {r['abs_err']:8.1e} {r['time_vs_eager']:8.2f} "
                     f"{r['mem_vs_eager']:8.2f} {vs_ours}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", help="N (default 4096 16384 65536; quick: 256 1024 4096)")
    parser.add_argument("--vocab", type=int, nargs="+", help="V (default 32000 4000; quick: 4096)")
    parser.add_argument("--hidden", type=int, help="H = E (default 5120; quick: 256)")
    parser.add_argument("--profile", nargs="+", default=[], metavar="IMPL",
                        help="after the sweep, profile one forward+backward of these implementations at the last "
                             "(V, N): top CUDA kernels by time, printed and saved beside the JSON as *_profile.txt")
    parser.add_argument("--chunk-mib", type=int, nargs="+", default=[],
                        help="also time ours with these logit chunk sizes (MiB; CUDA)")
    add_kernel_bench_args(parser, "loss", reps=5)
    args = parser.parse_args()
    cuda, quick, device, dtype = kernel_bench_setup(args)
    sizes = args.rows or ([256, 1024, 4096] if quick else [4096, 16384, 65536])
    vocabs = args.vocab or ([4096] if quick else [32000, 4000])
    H = args.hidden or (256 if quick else 5120)
    impls, missing = implementations(cuda, args.chunk_mib)
    notes = [f"{device_name()}, {dtype}, H=E={H}, R=N/4 regression rows, 1/8 of text rows ignored, "
             f"V sweep {vocabs} x N sweep {sizes}; forward+backward"]
    notes += [f"not run: {name}: {why}" for name, why in missing.items()]
    if not cuda:
        notes.append("NO CUDA: tiny sizes, PyTorch paths only. CPU numbers say nothing about a GPU.")
    print("\n".join(notes))
    rows = []
    for V in vocabs:
        for N in sizes:
            case = bench_case(N, V, H, impls, dtype, cuda, device, args.reps)
            rows += case
            print(format_table(case).split("\n", 2)[-1], flush=True)
            shapes = {"V": vocabs, "H": H, "E": H, "rows": sizes}
            record = {"quick": quick, "dtype": str(dtype), "shapes": shapes, "notes": notes, "rows": rows}
            json_path = save_results("loss", record, notes, format_table(rows), args.out)
            if cuda:
                torch.cuda.empty_cache()
    print("\n" + format_table(rows))
    if args.profile and cuda:
        inputs = make_inputs(sizes[-1], vocabs[-1], H, dtype, device)
        base = os.path.splitext(json_path)[0]
        text = "\n".join(f"{device_name()}; {name}, V {vocabs[-1]}, N {sizes[-1]}, H {H}, one forward+backward\n"
                         + profile_tables(impls[name], inputs, f"{base}_trace_{name}.json")
                         for name in args.profile if name in impls)
        print(text)
        with open(f"{base}_profile.txt", "w") as f:
            f.write(text)
        print(f"wrote {base}_profile.txt and the Chrome traces {base}_trace_*.json")


if __name__ == "__main__":
    main()
