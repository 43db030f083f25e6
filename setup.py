"""Builds the optional CUDA extension in csrc/ when a CUDA torch and nvcc are present; else a no-op.

All metadata lives in pyproject.toml. The package-dir mapping there installs kernels/ as
emu_mc.kernels.
"""
import glob
import os
import shutil

from setuptools import setup


def cuda_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("EMU_MC_SKIP_CUDA_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        print("emu_mc: CUDA torch or nvcc missing; skipping the optional csrc/ extension")
        return [], {}
    ext = CUDAExtension("emu_mc._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
