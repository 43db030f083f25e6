"""Compile the Triton kernels for an H100 (sm_90) on a machine without a GPU.

    python tests/kernels/compile_sm90.py resampler_attention '[[B, Lq, Lk, D, H, causal, bias], ...]'
    python tests/kernels/compile_sm90.py mixed_loss '[[N, V, H], ...]'

Runs the launchers on tensors that hold no data (meta device or zeros) with the kernel launch replaced
by a recorder, then compiles each recorded launch (its arguments' dtypes, its constexprs and num_warps)
for sm_90 with the ptxas bundled in the triton wheel. Prints one line per kernel: name and bytes of
shared memory. Must run without TRITON_INTERPRET (tests start it in a fresh interpreter).
"""
import json
import os
import subprocess
import sys
from typing import List, Sequence, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64",
           torch.int32: "*i32"}


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
    import emu_mc.kernels.mixed_loss as ml

    launches = []
    ml._blocks = lambda device: ml._BLOCKS_CUDA  # what a CUDA device gets
    ml._vocab_splits = lambda row_blocks, vocab_blocks, device: min(vocab_blocks, 4)
    ml._ce_forward_kernel = Recorder(ml._ce_forward_kernel, launches)
    ml._ce_backward_kernel = Recorder(ml._ce_backward_kernel, launches)
    for N, V, H in shapes:
        hidden = torch.empty(N, H, dtype=torch.bfloat16, device="meta")
        lm_weight = torch.empty(V, H, dtype=torch.bfloat16, device="meta")
        targets = torch.empty(N, dtype=torch.int64, device="meta")
        rows = torch.empty(N, dtype=torch.int64, device="meta")
        lse = torch.empty(N, device="meta")
        ml._ce_row_stats(hidden, lm_weight, targets, rows, 0, V, None)
        ml._ce_grads(hidden, lm_weight, targets, rows, lse, torch.empty(1, device="meta"), 0, V)
    return launches


def compile_for_sm90(kernel, args, meta):
    """triton.compile of one recorded launch for sm_90."""
    meta = dict(meta)
    options = {"num_warps": meta.pop("num_warps", 4)}
    values = dict(zip(kernel.arg_names, args))
    signature = {name: "constexpr" if name in meta else POINTER[v.dtype] if isinstance(v, torch.Tensor)
                 else "fp32" if isinstance(v, float) else "i32" for name, v in (values | meta).items()}
    return triton.compile(ASTSource(kernel, signature, meta), target=GPUTarget("cuda", 90, 32), options=options)


H100_SHARED_MEMORY = 232448  # bytes per block (227 KB)


def compiled_shared_memory(family: str, shapes: Sequence[Sequence]) -> List[Tuple[str, int]]:
    """[(kernel name, shared memory bytes)] for every launch of `family` at `shapes`, compiled for sm_90
    in a fresh interpreter without TRITON_INTERPRET. Raises AssertionError with stderr on failure."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), family, json.dumps(list(map(list, shapes)))],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [(name, int(shared)) for name, shared in (line.split() for line in out.stdout.splitlines())]


def ptxas_available() -> bool:
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def main(family: str, shapes_json: str) -> None:
    record = {"resampler_attention": resampler_attention_launches, "mixed_loss": mixed_loss_launches}[family]
    for kernel, args, meta in record(json.loads(shapes_json)):
        print(kernel.fn.__name__, compile_for_sm90(kernel, args, meta).metadata.shared)


if __name__ == "__main__":
    main(*sys.argv[1:])
