"""Optional accelerators: which are importable here, what a run uses each for, and the fallback.

Detection only imports (never installs or downloads); `report()` is logged once at the start of every
pretrain run so the log says which path ran. What each one does in this codebase today:
  triton kernels  fused resampler attention + mixed loss on CUDA (`*.impl: auto`); else PyTorch reference
  apex / TE       megatron-core's fused Adam, and with it fully_reshardable optimizer checkpoints;
                  else torch.optim.Adam and dp_reshardable checkpoints. TE also runs the LLM's attention
                  (THD packed documents) when model.llm.attention_impl picks it (auto does, on CUDA).
  DALI            data.decoder auto -> dali_gpu (nvJPEG/NVDEC) on CUDA; else PIL + PyAV
  emu_mc._C       the csrc/ extension: nothing uses it yet
  flash-attn      the LLM's packed-document attention (varlen) when attention_impl picks it (auto does,
                  on CUDA without TE); else FlexAttention on CUDA, SDPA on CPU. The resampler cannot
                  use it (learned bias); benchmarks/resampler_bench.py compares against it
"""
import functools
import importlib
from typing import Dict

import torch


@functools.lru_cache(maxsize=None)
def importable(module: str) -> bool:
    """Whether `module` imports here (checked once per process; a broken binary install counts as absent)."""
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or a broken binary install (OSError, RuntimeError, ...)
        return False
    return True


def llm_attention_path(impl: str) -> str:
    """What `model.llm.attention_impl` = impl runs here, and for auto what it passed over."""
    from emu_mc.model.document_attention import describe, resolve_attention_impl

    chosen = resolve_attention_impl(impl)
    line = f"{chosen} ({describe(chosen)})"
    if impl == "auto" and torch.cuda.is_available() and chosen != "te":
        missing = ["transformer-engine"] + (["flash-attn"] if chosen == "flex" else [])
        line += f"; auto: {' and '.join(missing)} not installed"
    return line


def report(llm_attention_impl: str = "auto") -> Dict[str, str]:
    """{accelerator: what this process uses, or the fallback and why}; `llm_attention_impl` is
    model.llm.attention_impl."""
    cuda = torch.cuda.is_available()
    apex = importable("apex.optimizers")
    te = importable("transformer_engine.pytorch")
    dali = importable("nvidia.dali")
    return {
        "triton kernels": "used (CUDA)" if cuda else "not used: no CUDA, PyTorch references run",
        "apex/transformer-engine fused Adam": (
            f"used ({'transformer-engine' if te else 'apex'})" if apex or te
            else "not installed: torch.optim.Adam, dp_reshardable optimizer checkpoints"),
        "DALI GPU decode": ("available (data.decoder auto picks it)" if dali and cuda
                            else "not used: " + ("no CUDA" if dali else "DALI not installed (extra .[dali])") + ", PIL + PyAV"),
        "csrc extension (emu_mc._C)": ("built (unused so far)" if importable("emu_mc._C")
                                       else "not built (nothing needs it yet)"),
        "flash-attn": "installed" if importable("flash_attn") else "not installed",
        "LLM attention": llm_attention_path(llm_attention_impl),
    }
