"""Run megatron-core on CPU (gloo) by answering its CUDA calls with CPU equivalents.

megatron-core assumes CUDA in many places. `enable()` patches, once per process and only when CUDA
is absent, exactly what a LLaMA-style GPTModel with the local layer spec needs (see
../shared/PLATFORM.md "megatron-core on CPU"):
  1. `torch.cuda.current_device()` answers the CPU device;
  2. factory calls that pass `device="cuda"` (or a CUDA index) are redirected to CPU by a
     TorchFunctionMode; `Tensor.cuda()` returns the tensor, `torch.cuda.synchronize()` does nothing;
  3. the model-parallel RNG tracker keeps CPU generator states (`torch.cuda.{get,set}_rng_state`,
     `torch.cuda.manual_seed` act on the CPU generator), seeded per TP rank as
     `model_parallel_cuda_manual_seed` does;
  4. `Tensor.type()` (no argument) names CPU tensors as CUDA ones ('torch.cuda.FloatTensor'): the
     optimizers (distributed and float16) accept only parameters whose type string says CUDA;
  5. the TransformerConfig must set use_cpu_initialization=True, gradient_accumulation_fusion=False
     and all fusions off: `megatron_cpu_config_overrides()` returns those fields.
With CUDA present, `enable()` does nothing and megatron runs unmodified.
"""
import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger("emu_mc.parallel")
_ENABLED = False


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites a `device=` keyword naming CUDA (or a bare CUDA index) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return func(*args, **kwargs)


def megatron_cpu_config_overrides() -> dict:
    """TransformerConfig fields that must be set for CPU execution (empty dict when CUDA exists)."""
    if torch.cuda.is_available():
        return {}
    return dict(
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_activation_fusion=False,
    )


def enable() -> bool:
    """Install the CPU shims if CUDA is absent. Idempotent. Returns whether the shims are active."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    _tensor_type = torch.Tensor.type

    def _type_as_cuda(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = _tensor_type(self)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return _tensor_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type_as_cuda

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    _CudaDeviceToCpu().__enter__()  # active for the rest of the process
    _ENABLED = True
    log.info("CUDA not available: megatron-core CPU compatibility layer enabled (gloo)")
    return True
