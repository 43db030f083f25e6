"""The accelerator report names every optional package and, on a machine without them, the fallback."""
import torch

from emu_mc.accelerators import report


def test_report_names_each_accelerator_and_its_fallback():
    paths = report()
    assert set(paths) == {"triton kernels", "apex/transformer-engine fused Adam", "DALI GPU decode",
                          "csrc extension (emu_mc._C)", "flash-attn", "LLM attention"}
    if not torch.cuda.is_available():
        assert paths["triton kernels"] == "not used: no CUDA, PyTorch references run"
        assert paths["DALI GPU decode"].startswith("not used: no CUDA")
        assert paths["LLM attention"].startswith("sdpa (")
        assert report("local")["LLM attention"].startswith("local (megatron unfused")
