"""The mixed loss seam: one call, Triton kernel or PyTorch reference (config `model.loss.impl`)."""
import logging
from typing import Callable

import torch

from emu_mc.kernels.mixed_loss import mixed_ce_regression_loss_reference

log = logging.getLogger("emu_mc.model")


def mixed_loss_fn(impl: str) -> Callable:
    """'triton' (fused, never materialises logits), 'reference' (PyTorch), 'auto' (Triton on CUDA).

    Both take (hidden [N,H], lm_weight [V,H], targets [N], reg_head_weight [E,H], reg_index [R],
    reg_targets [R,E], *, ce_loss_weight, reg_loss_weight, ignore_index, valid_vocab_size, tp_group,
    text_index)
    and return (total, ce, reg) fp32 scalars; see emu_mc/kernels/mixed_loss.py.
    """
    if impl == "reference" or (impl == "auto" and not torch.cuda.is_available()):
        fn = mixed_ce_regression_loss_reference
    else:
        from emu_mc.kernels.mixed_loss import mixed_ce_regression_loss as fn
    log.info("mixed loss: %s", fn.__name__)
    return fn
