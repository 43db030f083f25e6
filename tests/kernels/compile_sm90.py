"""Compile the Triton kernels for an H100 (sm_90) on a machine without a GPU, as the runtime would.

    python tests/kernels/compile_sm90.py resampler_attention '[[B, Lq, Lk, D, H, causal, bias], ...]'
    python tests/kernels/compile_sm90.py mixed_loss '[[N, V, H], ...]'

Runs the launchers on tensors that hold no data (meta device or zeros) with the kernel launch replaced
by a recorder, then compiles each distinct recorded launch for sm_90 with the ptxas bundled in the
triton wheel. The launch goes through the JIT's own argument binder, so the compile gets the runtime's
specialisation: pointers 16-byte aligned and integers divisible by 16 marked `tt.divisibility=16`,
integers equal to 1 folded to constants (a meta tensor stands in with a CPU tensor at the same
alignment). Prints one line per kernel: name, bytes of shared memory, registers per thread, bytes
spilled (stores + loads, from ptxas' own log). Must run without TRITON_INTERPRET (tests start it in a
fresh interpreter).
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import List, NamedTuple, Sequence, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

SM90 = GPUTarget("cuda", 90, 32)
H100_SHARED_MEMORY = 232448  # bytes per block (227 KB)


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **meta)` records instead of launching."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((self.kernel, args, meta))


def resampler_attention_launches(shapes):
    import emu_mc.kernels.resampler_attention as ra

    launches = []
    ra._launch = lambda kernel, grid, *args, **meta: Recorder(kernel, launches)[grid](*args, **meta)
    for B, Lq, Lk, D, H, causal, bias in shapes:
        q, k = torch.zeros(B, H, Lq, D, dtype=torch.bfloat16), torch.zeros(B, H, Lk, D, dtype=torch.bfloat16)
        rel_bias = torch.zeros(32, H) if bias else None
        lse = torch.zeros(B * H, Lq)
        ra._forward(q, k, k, rel_bias, causal, 128, 1.0)
        ra._backward(q, q, k, k, q, lse, rel_bias, causal, 128, 1.0)
    return launches


def mixed_loss_launches(shapes):
    """The CE chunk loop's launches in bf16 as a CUDA device configures them (chunk rows, blocks), with
    one rank holding the vocabulary and as rank 1 of a vocab-parallel group (the ranks' statistics are
    not combined: only the launches matter)."""
    import emu_mc.kernels.mixed_loss as ml

    launches = []
    cuda = torch.device("cuda")
    chunk_rows, row_kernel_meta = ml._chunk_rows, ml._row_kernel_meta
    ml._chunk_rows = lambda v_local, element_size, device: chunk_rows(v_local, element_size, cuda)
    ml._row_kernel_meta = lambda v_local, device: row_kernel_meta(v_local, cuda)
    ml._launch = lambda kernel, grid, *args, **meta: Recorder(kernel, launches)[grid](*args, **meta)
    ml._combine_over_ranks = lambda stats, group: None
    for N, V, H in shapes:
        hidden = torch.empty(N, H, dtype=torch.bfloat16, device="meta")
        lm_weight = torch.empty(V, H, dtype=torch.bfloat16, device="meta")
        targets = torch.empty(N, dtype=torch.int64, device="meta")
        for vocab_start, tp_group in ((0, None), (V, "vocab-parallel")):
            ml._cross_entropy_chunks(hidden, lm_weight, targets, -100, vocab_start, V, tp_group,
                                     torch.empty_like(hidden), torch.empty_like(lm_weight))
    return launches


def _at_same_alignment(arg):
    """A meta tensor -> a CPU tensor whose data pointer has the same alignment as a fresh CUDA
    allocation at the meta tensor's storage offset (both allocators align blocks to >= 64 bytes)."""
    if isinstance(arg, torch.Tensor) and arg.is_meta:
        return torch.empty(arg.storage_offset() + 1, dtype=arg.dtype)[arg.storage_offset():]
    return arg


def runtime_source(kernel, args, meta):
    """(ASTSource, options) of one launch, built by the JIT's own binder and argument packing for
    sm_90 (what JITFunction.run compiles on an H100)."""
    backend = make_backend(SM90)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*map(_at_same_alignment, args), **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound_args, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


class CompiledLaunch(NamedTuple):
    name: str
    shared: int  # bytes of shared memory per block
    registers: int  # per thread
    spilled: int  # bytes of spill stores + loads


def compile_for_sm90(kernel, args, meta) -> CompiledLaunch:
    """triton.compile of one recorded launch for sm_90, with ptxas' register and spill report."""
    source, options = runtime_source(kernel, args, meta)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: triton prints ptxas -v output
        compiled = triton.compile(source, target=SM90, options=options.__dict__)
    ptxas = log.getvalue()
    registers = re.search(r"Used (\d+) registers", ptxas)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    if registers is None or spills is None:
        raise RuntimeError(f"no ptxas report for {kernel.fn.__name__}:\n{ptxas}")
    return CompiledLaunch(kernel.fn.__name__, compiled.metadata.shared, int(registers.group(1)),
                          int(spills.group(1)) + int(spills.group(2)))


def compiled_kernels(family: str, shapes: Sequence[Sequence]) -> List[CompiledLaunch]:
    """Every distinct launch of `family` at `shapes`, compiled for sm_90 in a fresh interpreter without
    TRITON_INTERPRET. Raises AssertionError with
    stderr on failure."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), family, json.dumps(list(map(list, shapes)))],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [CompiledLaunch(name, *map(int, numbers)) for name, *numbers in map(str.split, out.stdout.splitlines())]


def compiled_shared_memory(family: str, shapes: Sequence[Sequence]) -> List[Tuple[str, int]]:
    """[(kernel name, shared memory bytes)] of `compiled_kernels`."""
    return [(launch.name, launch.shared) for launch in compiled_kernels(family, shapes)]


def ptxas_available() -> bool:
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def main(family: str, shapes_json: str) -> None:
    record = {"resampler_attention": resampler_attention_launches, "mixed_loss": mixed_loss_launches}[family]
    seen = set()
    with tempfile.TemporaryDirectory() as cache:  # empty: ptxas runs (and reports) for every kernel
        os.environ |= {"TRITON_DEFAULT_FP_FUSION": "1", "TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": cache}
        for kernel, args, meta in record(json.loads(shapes_json)):
            source, options = runtime_source(kernel, args, meta)
            key = (kernel.fn.__name__, str(source.signature), str(source.constants), str(source.attrs), str(options))
            if key not in seen:
                seen.add(key)
                print(kernel.fn.__name__, *compile_for_sm90(kernel, args, meta)[1:])


if __name__ == "__main__":
    main(*sys.argv[1:])
