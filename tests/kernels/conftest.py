"""Kernel tests: without CUDA, Triton kernels run on CPU tensors through the Triton interpreter.

Triton reads TRITON_INTERPRET when a `@triton.jit` function is defined (not when triton is imported),
so it must be set before a kernels module is imported. tests/conftest.py imports neither triton nor a
kernels module, and pytest loads this file before importing the test modules below it. A kernels
module that an earlier-collected test already imported (emu_mc.model.resampler imports the resampler
reference) is reloaded, so its kernels are defined again as interpreted functions.
"""
import importlib
import os
import sys

import pytest
import torch

INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in sorted(m for m in sys.modules if m.startswith("emu_mc.kernels.")):
        importlib.reload(sys.modules[_name])

DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: "cuda", or "cpu" under the Triton interpreter."""
    return DEVICE
