"""LLM attention on packed documents: the backends of emu_mc/model/document_attention.py side by side.

    python benchmarks/attention_bench.py             # GPU: Emu-14B attention (40 heads x 128, and 5 local heads
                                                     #      = TP 8), S 4096 first, then 2048 and 8192, within --budget-s
    python benchmarks/attention_bench.py --full      # GPU: every row, no time budget
    python benchmarks/attention_bench.py --quick     # small sizes (the default without CUDA)

Workload: one packed row (B = 1, as Emu-14B trains), q, k, v [S, 1, H, 128] in megatron's layout, bf16 on
GPU; documents: one (S), 4 equal, or a realistic mix (lengths drawn in [S/32, S/2], the rest padding).
Backends (each compared with local's output, |err|):
  local         megatron's unfused math with the dense [B, 1, S, S] mask: fp32 softmax, probabilities kept
  sdpa          torch SDPA per document-length bucket (flash on GPU)
  flex          FlexAttention with the document BlockMask, torch.compile (GPU only: no CPU backward)
  flash_varlen  flash-attn varlen over cu_seqlens (only if flash-attn is installed)
  sdpa_causal   torch SDPA is_causal=True over the whole row: one-document rows only, the speed of light
(te is timed through the train bench: it runs inside megatron's TEDotProductAttention.)
Reported per row: median ms of forward (autograd recording, as in training) and of forward+backward;
peak memory of forward+backward above the inputs; prep ms = building PackedDocuments (once per
micro-batch, shared by all layers); TFLOP/s over in-document causal pairs only (forward 4 * pairs * H *
D, forward+backward 3x that, as emu_mc/metrics.py counts), so local's wasted pairs do not count; first s
= the first forward+backward call (torch.compile included). Rows are saved as they finish: a run cut
short by its time limit keeps what it measured.
"""
import argparse
import dataclasses
import time

import torch

from emu_mc.model.document_attention import (PackedDocuments, causal_attention, causal_pairs, document_attention,
                                             document_attention_reference, document_block_mask,
                                             installed_backends)

from bench_common import add_kernel_bench_args, device_name, kernel_bench_setup, peak_mib, save_results, time_ms

HEAD_DIM = 128
MIXES = ("4 equal", "one", "mixed")


def document_lengths(mix: str, s: int) -> tuple:
    """(document lengths, padding) of one row of s tokens."""
    if mix == "one":
        return (s,), 0
    if mix == "4 equal":
        return (s // 4,) * 4, s - 4 * (s // 4)
    g = torch.Generator().manual_seed(s)
    lengths, left = [], s
    while True:
        n = int(torch.randint(max(1, s // 32), s // 2 + 1, (1,), generator=g))
        if n > left:
            return tuple(lengths), left
        lengths.append(n)
        left -= n


def segment_ids(mix: str, s: int, device) -> torch.Tensor:
    lengths, pad = document_lengths(mix, s)
    ids = [d for d, n in enumerate(lengths) for _ in range(n)] + [-1] * pad
    return torch.tensor([ids], device=device)


def backends(cuda: bool) -> tuple:
    """({name: attention(q, k, v, docs, seg) -> [S, B, H * D]} in run order, {name: why not run})."""
    fused = lambda impl: lambda q, k, v, docs, seg: document_attention(q, k, v, docs, impl)
    run = {"local": lambda q, k, v, docs, seg: document_attention_reference(q, k, v, seg)}
    missing = {}
    if cuda:
        run["flex"] = fused("flex")
    else:
        missing["flex"] = "no CUDA (CPU FlexAttention has no backward; its eager forward is the dense math)"
    if cuda and installed_backends()["flash_varlen"]:
        run["flash_varlen"] = fused("flash_varlen")
    else:
        missing["flash_varlen"] = "flash-attn not installed" if cuda else "no CUDA"
    run["sdpa"] = fused("sdpa")
    return run, missing


def sdpa_causal(q, k, v, docs, seg):
    """The whole row as one causal sequence (right only for one-document rows)."""
    return causal_attention(q, k, v, q.shape[-1] ** -0.5)


def preparation(name, seg):
    """The micro-batch preparation `name` times as prep_ms, or None: the backend's PackedDocuments;
    for flex_blockmask flex's with the BlockMask even where the row is one document (where `flex`
    itself runs causal SDPA), to show what the FlexAttention kernel costs on the plain causal pattern."""
    if name == "flex_blockmask":
        return lambda: dataclasses.replace(PackedDocuments.from_segment_ids(seg, "flex"), causal_only=False,
                                           block_mask=document_block_mask(seg))
    if name in ("sdpa", "flex", "flash_varlen"):
        return lambda: PackedDocuments.from_segment_ids(seg, name)
    return None


def bench_row(s, heads, mix, impls, dtype, cuda, device, reps):
    """Yields one result per backend for one (S, heads, document mix), as each finishes."""
    seg = segment_ids(mix, s, device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(s, 1, heads, HEAD_DIM, generator=g, device=device).to(dtype).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(s, 1, heads * HEAD_DIM, generator=g, device=device).to(dtype)
    fwd_flops = 4 * causal_pairs(seg) * heads * HEAD_DIM
    lengths, pad = document_lengths(mix, s)
    meta = {"S": s, "heads": heads, "mix": mix, "documents": len(lengths), "padding": pad}
    if mix == "one":  # the speed of light for a single document, right after local
        extra = [("sdpa_causal", sdpa_causal)] + ([("flex_blockmask", impls["flex"])] if "flex" in impls else [])
        impls = dict([next(iter(impls.items())), *extra, *list(impls.items())[1:]])
    want, local = None, None
    for name, attend in impls.items():
        row = dict(meta, impl=name)
        prep = preparation(name, seg)
        try:
            docs = prep() if prep else None
            fwd = lambda: attend(q, k, v, docs, seg)
            fwd_bwd = lambda: torch.autograd.grad(fwd(), (q, k, v), grad_out)
            start = time.perf_counter()
            out = fwd().detach()  # the first calls compile (flex)
            fwd_bwd()
            if cuda:
                torch.cuda.synchronize()
            row["first_s"] = time.perf_counter() - start
            want = out if want is None else want
            row["abs_err"] = (out.float() - want.float()).abs().max().item()
            del out
            row["fwd_ms"] = time_ms(fwd, cuda, reps, warmup_ms=5, rep_ms=40)
            row["fwd_bwd_ms"] = time_ms(fwd_bwd, cuda, reps, warmup_ms=5, rep_ms=40)
            row["peak_mib"] = peak_mib(fwd_bwd, cuda)
            row["prep_ms"] = time_ms(prep, cuda, reps, warmup_ms=2, rep_ms=10) if prep else 0.0
            row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3 * fwd_flops / row["fwd_bwd_ms"] / 1e9
            if name == "local":
                local = row
            elif local is not None:
                row["speedup_vs_local"] = local["fwd_bwd_ms"] / row["fwd_bwd_ms"]
                row["mem_vs_local"] = row["peak_mib"] / max(local["peak_mib"], 1e-9)
        except Exception as exc:  # e.g. local out of memory at S = 8192
            row["skipped"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
        finally:
            if cuda:
                torch.cuda.empty_cache()
        yield row


def plan(quick: bool, full: bool) -> list:
    """(S, heads, mix) in priority order: the issue's targets first (S 4096, 40 heads)."""
    if quick:
        return [(s, 4, mix) for s in (256, 512) for mix in MIXES]
    rows = [(4096, 40, mix) for mix in MIXES] + [(2048, 40, mix) for mix in MIXES]
    rows += [(4096, 5, mix) for mix in MIXES] + [(8192, 40, mix) for mix in MIXES]
    rows += [(s, 5, mix) for s in (2048, 8192) for mix in MIXES]
    return rows


def targets(rows) -> list:
    """The issue's H100 targets, where the rows needed were measured."""
    by = {(r["S"], r["heads"], r["mix"], r["impl"]): r for r in rows if "fwd_bwd_ms" in r}
    lines = []
    flex, local = by.get((4096, 40, "4 equal", "flex")), by.get((4096, 40, "4 equal", "local"))
    if flex and local:
        speed, mem = local["fwd_bwd_ms"] / flex["fwd_bwd_ms"], flex["peak_mib"] / local["peak_mib"]
        lines.append(f"target flex vs local, S 4096, 4 docs, fwd+bwd: {speed:.2f}x faster (want >= 3), memory "
                     f"{mem:.3f} of local (want <= 0.25): {'met' if speed >= 3 and mem <= 0.25 else 'NOT met'}")
    flex, causal = by.get((4096, 40, "one", "flex")), by.get((4096, 40, "one", "sdpa_causal"))
    if flex and causal:
        ratio = flex["fwd_bwd_ms"] / causal["fwd_bwd_ms"]
        lines.append(f"target flex vs SDPA is_causal, one document, S 4096, fwd+bwd: {ratio:.2f}x the time "
                     f"(want <= 1.25): {'met' if ratio <= 1.25 else 'NOT met'} (flex runs causal SDPA on rows "
                     "of one document; flex_blockmask is the FlexAttention kernel there)")
    return lines


HEADER = (f"{'S':>5s} {'H':>3s} {'docs':9s} {'impl':12s} {'fwd ms':>8s} {'f+b ms':>8s} {'peak MiB':>9s} "
          f"{'prep ms':>7s} {'f TF/s':>7s} {'f+b TF/s':>8s} {'x local':>7s} {'m/local':>7s} {'|err|':>8s} {'first s':>7s}")


def format_row(r) -> str:
    start = f"{r['S']:5d} {r['heads']:3d} {r['mix']:9s} {r['impl']:12s}"
    if "skipped" in r:
        return f"{start} skipped: {r['skipped']}"
    vs = " ".join(f"{r[k]:7.2f}" if k in r else f"{'-':>7s}" for k in ("speedup_vs_local", "mem_vs_local"))
    return (f"{start} {r['fwd_ms']:8.2f} {r['fwd_bwd_ms']:8.2f} {r['peak_mib']:9.1f} {r['prep_ms']:7.2f} "
            f"{r['fwd_tflops']:7.3g} {r['fwd_bwd_tflops']:8.3g} {vs} {r['abs_err']:8.1e} {r['first_s']:7.1f}")


def format_table(rows) -> str:
    return "\n".join([HEADER, "-" * len(HEADER)] + [format_row(r) for r in rows] + [""] + targets(rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="GPU: every row of the sweep, no time budget")
    parser.add_argument("--budget-s", type=float, default=28.0,
                        help="GPU: start no new row after this many seconds (compiles included); default 28")
    add_kernel_bench_args(parser, "attention", reps=3)
    args = parser.parse_args()
    cuda, quick, device, dtype = kernel_bench_setup(args)
    impls, missing = backends(cuda)
    notes = [f"{device_name()}, {dtype}, B = 1 packed row, head dim {HEAD_DIM}; in-document causal pairs only "
             "in TFLOP/s; fwd+bwd = 3 x fwd FLOPs"]
    notes += [f"not run: {name}: {why}" for name, why in missing.items()]
    if not cuda:
        notes.append("NO CUDA: small sizes (4 heads, S 256/512), CPU backends only (local, sdpa). CPU numbers "
                     "say nothing about a GPU.")
    print("\n".join(notes), flush=True)
    start, rows, todo = time.perf_counter(), [], plan(quick, args.full)
    save = lambda quiet: save_results("attention", {"quick": quick, "dtype": str(dtype), "notes": notes, "rows": rows},
                                      notes, format_table(rows), args.out, quiet=quiet)
    print(HEADER)
    for i, (s, heads, mix) in enumerate(todo):
        if cuda and not args.full and time.perf_counter() - start > args.budget_s:
            notes.append(f"time budget ({args.budget_s:.0f} s) spent: {len(todo) - i} rows not run (--full runs all)")
            print(notes[-1])
            break
        for row in bench_row(s, heads, mix, impls, dtype, cuda, device, args.reps):  # saved as each ends
            rows.append(row)
            print(format_row(row), flush=True)
            save(quiet=True)
    print("\n" + "\n".join(targets(rows)))
    save(quiet=False)


if __name__ == "__main__":
    main()
