"""Triton kernels, installed as ``emu_mc.kernels``. Each op file holds its kernels, the
autograd.Function that launches them, and the plain PyTorch reference it is tested against."""
