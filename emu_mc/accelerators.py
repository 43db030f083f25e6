"""Optional accelerators: which are importable here, what a run uses each for, and the fallback.

Detection only imports (never installs or downloads); `report()` is logged once at the start of every
pretrain run so the log says which path ran. What each one does in this codebase today:
  triton kernels  fused resampler attention + mixed loss on CUDA (`*.impl: auto`); else PyTorch reference
  apex / TE       megatron-core's fused Adam, and with it fully_reshardable optimizer checkpoints;
                  else torch.optim.Adam and dp_reshardable checkpoints. (The LLM's layers use
                  megatron-core's local spec with or without TE: TE layers are not wired in yet.)
  DALI            data.decoder auto -> dali_gpu (nvJPEG/NVDEC) on CUDA; else PIL + PyAV
  emu_mc._C       the csrc/ extension: nothing uses it yet
  flash-attn      not used by training (the resampler needs a learned bias, the LLM uses megatron's
                  attention); benchmarks/resampler_bench.py compares against it
"""
import importlib
from typing import Dict

import torch


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or a broken binary install (OSError, RuntimeError, ...)
        return False
    return True


def report() -> Dict[str, str]:
    """{accelerator: what this process uses, or the fallback and why}."""
    cuda = torch.cuda.is_available()
    apex = _importable("apex.optimizers")
    te = _importable("transformer_engine.pytorch")
    dali = _importable("nvidia.dali")
    return {
        "triton kernels": "used (CUDA)" if cuda else "not used: no CUDA, PyTorch references run",
        "apex/transformer-engine fused Adam": (
            f"used ({'transformer-engine' if te else 'apex'})" if apex or te
            else "not installed: torch.optim.Adam, dp_reshardable optimizer checkpoints"),
        "DALI GPU decode": ("available (data.decoder auto picks it)" if dali and cuda
                            else "not used: " + ("no CUDA" if dali else "DALI not installed (extra .[dali])") + ", PIL + PyAV"),
        "csrc extension (emu_mc._C)": ("built (unused so far)" if _importable("emu_mc._C")
                                       else "not built (nothing needs it yet)"),
        "flash-attn": ("installed (benchmarks only)" if _importable("flash_attn")
                       else "not installed (benchmarks only)"),
    }
