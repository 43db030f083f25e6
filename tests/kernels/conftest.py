"""Kernel tests: without CUDA, Triton kernels run on CPU tensors through the Triton interpreter.

TRITON_INTERPRET=1 is set by tests/conftest.py, before triton is first imported (triton.language defines
its own @triton.jit helpers on import, so setting it later is too late). This file checks that it took.
"""
import pytest
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

INTERPRET = not torch.cuda.is_available()
if INTERPRET and not isinstance(tl.standard.sum, InterpretedFunction):
    raise pytest.UsageError("no CUDA, but triton was imported before TRITON_INTERPRET=1 was set: kernels would not "
                            "run under the interpreter (see tests/conftest.py)")

DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: "cuda", or "cpu" under the Triton interpreter."""
    return DEVICE
