"""Mixed next-token cross-entropy + visual-embedding regression loss.

Inputs: hidden [N, H] (final-norm LLM states, flattened over batch and sequence), lm_weight [V, H]
(the output layer; with `tp_group` this rank's contiguous vocab shard [V / tp, H]), targets [N] long
(global token ids, `ignore_index` where no text target), reg_head_weight [E, H] (the regression head,
E = H for Emu), reg_index [R] long (rows of `hidden` at regression positions), reg_targets [R, E].

Returns (total, ce, reg), fp32 scalars:
  ce  = mean over non-ignored rows of -log softmax(hidden @ lm_weight.T)[target]   (0 when none)
  reg = mean over rows and features of (hidden[reg_index] @ reg_head_weight.T - reg_targets)^2 (0 when R = 0)
  total = ce_loss_weight * ce + reg_loss_weight * reg
`valid_vocab_size` (global) excludes padded vocabulary rows from the softmax.

This file holds the plain PyTorch reference (materialises the logits): the fallback and the ground
truth of the tests.
"""
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _AllReduceSum(torch.autograd.Function):
    """Sum across `group` in forward; gradient passes through unchanged (each rank's own share)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _vocab_parallel_cross_entropy(logits, targets, valid, group):
    """Per-row CE [N] of vocab-sharded fp32 logits [N, V_local]; rank r holds ids [r*V_local, (r+1)*V_local)."""
    rank, v_local = dist.get_rank(group), logits.shape[1]
    global_max = logits.detach().max(dim=1).values
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - global_max[:, None]
    sum_exp = _AllReduceSum.apply(shifted.exp().sum(dim=1), group)
    local_ids = targets - rank * v_local
    owned = (local_ids >= 0) & (local_ids < v_local) & valid
    picked = shifted.gather(1, local_ids.clamp(0, v_local - 1)[:, None]).squeeze(1) * owned
    target_logit = _AllReduceSum.apply(picked, group)
    return sum_exp.log() - target_logit


def mixed_ce_regression_loss_reference(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    reg_head_weight: torch.Tensor,
    reg_index: torch.Tensor,
    reg_targets: torch.Tensor,
    *,
    ce_loss_weight: float = 1.0,
    reg_loss_weight: float = 1.0,
    ignore_index: int = -100,
    valid_vocab_size: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
):
    """Eager reference; see the module docstring. Returns (total, ce, reg) fp32 scalars."""
    logits = hidden.float() @ lm_weight.float().t()  # [N, V_local]
    if valid_vocab_size is not None:
        rank = dist.get_rank(tp_group) if tp_group is not None else 0
        vocab_ids = torch.arange(logits.shape[1], device=logits.device) + rank * logits.shape[1]
        logits = logits.masked_fill(vocab_ids >= valid_vocab_size, float("-inf"))
    valid = targets != ignore_index
    num_valid = valid.sum()
    if tp_group is None:
        per_row = F.cross_entropy(logits, targets.masked_fill(~valid, 0), reduction="none")
    else:
        per_row = _vocab_parallel_cross_entropy(logits, targets, valid, tp_group)
    ce = (per_row * valid).sum() / num_valid.clamp(min=1)

    if reg_index.numel() > 0:
        pred = hidden[reg_index].float() @ reg_head_weight.float().t()
        reg = F.mse_loss(pred, reg_targets.float())
    else:
        reg = hidden.float().sum() * 0.0  # keeps the graph connected, value exactly 0
    total = ce_loss_weight * ce + reg_loss_weight * reg
    return total, ce, reg
