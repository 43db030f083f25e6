"""Mixed next-token cross-entropy + visual-embedding regression loss.

Inputs: hidden [N, H] (final-norm LLM states, flattened over batch and sequence), lm_weight [V, H]
(the output layer; with `tp_group` this rank's contiguous vocab shard [V / tp, H]), targets [N] long
(global token ids, `ignore_index` where no text target), reg_head_weight [E, H] (the regression head,
E = H for Emu), reg_index [R] long (rows of `hidden` at regression positions), reg_targets [R, E].

Returns (total, ce, reg), fp32 scalars:
  ce  = mean over non-ignored rows of -log softmax(hidden @ lm_weight.T)[target]   (0 when none)
  reg = mean over rows and features of (hidden[reg_index] @ reg_head_weight.T - reg_targets)^2 (0 when R = 0)
  total = ce_loss_weight * ce + reg_loss_weight * reg
`valid_vocab_size` (global) excludes padded vocabulary rows from the softmax; targets must lie below it.
With `tp_group`, rank r holds vocab ids [r * V_local, (r + 1) * V_local): every rank returns the same
(full) ce and reg, and the gradient of `hidden` on a rank is its own vocab shard's share of the CE term
plus the whole regression term (the caller all-reduces, e.g. megatron's column-parallel input region;
see EmuModel.loss). Empty terms have value 0 and zero gradients.

This file holds the plain PyTorch reference `mixed_ce_regression_loss_reference` (materialises the
[N, V] logits: the fallback and the ground truth of the tests) and the fused Triton op
`mixed_ce_regression_loss` (same signature and semantics; fp16, bf16 or fp32 inputs), which never
holds more than a [BLOCK_N, BLOCK_V] tile of logits:
  forward   CE over the non-ignored rows only (gathered by index inside the kernel). One program per
            (row block, vocab split) streams its vocab blocks: logits tile = h @ W_blk^T accumulated in
            fp32 over hidden blocks, online max / sum-exp and the target logit per row. Each split
            writes its per-row logsumexp and target logit, combined in torch; with `tp_group`, one
            all_gather of every rank's [2, M] (logsumexp, target logit) combines the ranks the same
            way. Saves the inputs and the row logsumexp [M] fp32.
  backward  one program per (row block, vocab block) recomputes its logits tile, forms
            dlogits = softmax - onehot (fp32, rounded to the input dtype for the two dots, the per-row
            scale grad_ce / M applied after them in fp32 so fp16 does not underflow), and atomically
            adds dlogits @ W_blk into an fp32 grad_hidden [N, H] and dlogits^T @ h into an fp32
            grad_lm_weight [V_local, H], hidden block by hidden block. Atomics make the summation order,
            hence the last bits of the gradients, vary from run to run.
The regression term (R x H by H x E) is plain fp32 torch matmuls inside the same autograd.Function,
recomputed in backward rather than saved.
"""
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl


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
    picked = shifted.gather(1, local_ids.clamp(0, v_local - 1)[:, None]).squeeze(1)
    picked = torch.where(owned, picked, 0.0)  # not `* owned`: a padded (-inf) column times 0 is NaN
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


# Tile sizes (rows, vocab, hidden). The interpreter runs programs one by one, so small vocab tiles there
# let small test shapes cover several blocks; GPU values are a starting point, not tuned.
_BLOCKS_CUDA = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64)
_BLOCKS_INTERPRETER = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=64)


@triton.jit
def _logits_tile(h_ptr, w_ptr, row_ids, row_mask, cols, col_mask, H, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] = hidden[row_ids] @ lm_weight[cols]^T, summed over hidden blocks."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        h = tl.load(h_ptr + row_ids[:, None] * stride_h + ks[None, :],
                    mask=row_mask[:, None] & (ks < H)[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                    mask=col_mask[:, None] & (ks < H)[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _rows(rows_ptr, targets_ptr, M, vocab_start, BLOCK_N: tl.constexpr):
    """This program's row block: (positions in 0..M, mask, hidden row ids int64, target ids local to the shard)."""
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < M
    row_ids = tl.load(rows_ptr + offs, mask=row_mask, other=0)
    local_target = tl.load(targets_ptr + row_ids, mask=row_mask, other=0) - vocab_start
    return offs, row_mask, row_ids, local_target


@triton.jit
def _ce_forward_kernel(h_ptr, w_ptr, targets_ptr, rows_ptr, lse_ptr, target_logit_ptr,
                       M, H, v_valid, vocab_start, blocks_per_split, stride_h, stride_w,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Program (row block, split): per-row logsumexp and target logit over the split's vocab blocks,
    stored at [split, row] of lse / target_logit [splits, M] (fp32; -inf and 0 for a split with no
    valid column)."""
    offs, row_mask, row_ids, local_target = _rows(rows_ptr, targets_ptr, M, vocab_start, BLOCK_N)
    split = tl.program_id(1)
    v_begin = split * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, v_valid)
    row_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v in range(v_begin, v_end, BLOCK_V):  # every block holds >= 1 valid column: row_max turns finite
        cols = (v + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_valid
        logits = _logits_tile(h_ptr, w_ptr, row_ids, row_mask, cols, col_mask, H, stride_h, stride_w,
                              BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        row_max = new_max
        is_target = (cols[None, :] == local_target[:, None]) & col_mask[None, :]
        target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
    tl.store(lse_ptr + split * M + offs, row_max + tl.log(sum_exp), mask=row_mask)
    tl.store(target_logit_ptr + split * M + offs, target_logit, mask=row_mask)


@triton.jit
def _ce_backward_kernel(h_ptr, w_ptr, targets_ptr, rows_ptr, lse_ptr, scale_ptr, grad_h_ptr, grad_w_ptr,
                        M, H, v_valid, vocab_start, stride_h, stride_w, stride_grad_h, stride_grad_w,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Program (row block, vocab block): atomically adds its share of scale * dCE/dlogits @ W into
    grad_h [N, H] and of its transpose @ h into grad_w [V_local, H] (both fp32)."""
    offs, row_mask, row_ids, local_target = _rows(rows_ptr, targets_ptr, M, vocab_start, BLOCK_N)
    cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_mask = cols < v_valid
    logits = _logits_tile(h_ptr, w_ptr, row_ids, row_mask, cols, col_mask, H, stride_h, stride_w,
                          BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    lse = tl.load(lse_ptr + offs, mask=row_mask, other=0.0)
    dlogits = tl.exp(logits - lse[:, None]) - tl.where(cols[None, :] == local_target[:, None], 1.0, 0.0)
    dlogits = tl.where(row_mask[:, None] & col_mask[None, :], dlogits, 0.0).to(h_ptr.dtype.element_ty)
    scale = tl.load(scale_ptr)
    for k in range(0, H, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        h_mask = row_mask[:, None] & (ks < H)[None, :]
        w_mask = col_mask[:, None] & (ks < H)[None, :]
        h = tl.load(h_ptr + row_ids[:, None] * stride_h + ks[None, :], mask=h_mask, other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=w_mask, other=0.0)
        grad_h = tl.dot(dlogits, w, input_precision=DOT_PRECISION) * scale
        tl.atomic_add(grad_h_ptr + row_ids[:, None] * stride_grad_h + ks[None, :], grad_h, mask=h_mask)
        grad_w = tl.dot(tl.trans(dlogits), h, input_precision=DOT_PRECISION) * scale
        tl.atomic_add(grad_w_ptr + cols[:, None] * stride_grad_w + ks[None, :], grad_w, mask=w_mask)


def _blocks(device: torch.device) -> dict:
    return _BLOCKS_CUDA if device.type == "cuda" else _BLOCKS_INTERPRETER


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32, like the reference's matmul


def _vocab_splits(row_blocks: int, vocab_blocks: int, device: torch.device) -> int:
    """How many vocab ranges the forward splits into: enough programs to fill the GPU (4 per SM) when
    there are few row blocks; under the interpreter 4 ranges at most, so small tests cover the combine."""
    wanted_programs = 4 * (torch.cuda.get_device_properties(device).multi_processor_count
                           if device.type == "cuda" else 1)
    return max(1, min(vocab_blocks, triton.cdiv(wanted_programs, row_blocks)))


def _ce_row_stats(hidden, lm_weight, targets, rows, vocab_start, v_valid, tp_group):
    """Global per-row logsumexp and target logit, each [M] fp32, of the rows `rows` [M] of hidden."""
    blocks = _blocks(hidden.device)
    vocab_blocks = triton.cdiv(v_valid, blocks["BLOCK_V"])
    row_blocks = triton.cdiv(rows.numel(), blocks["BLOCK_N"])
    blocks_per_split = max(1, triton.cdiv(vocab_blocks, _vocab_splits(row_blocks, vocab_blocks, hidden.device)))
    splits = max(1, triton.cdiv(vocab_blocks, blocks_per_split))  # 1 (writing -inf, 0) for a padding-only shard
    stats = torch.empty(2, splits, rows.numel(), device=hidden.device, dtype=torch.float32)
    _ce_forward_kernel[(row_blocks, splits)](
        hidden, lm_weight, targets, rows, stats[0], stats[1],
        rows.numel(), hidden.shape[1], v_valid, vocab_start, blocks_per_split, hidden.stride(0), lm_weight.stride(0),
        DOT_PRECISION=_dot_precision(hidden.dtype), **blocks,
    )
    lse, target_logit = torch.logsumexp(stats[0], dim=0), stats[1].sum(dim=0)
    if tp_group is not None:  # [tp, 2, M] -> the same combine across ranks
        gathered = torch.empty(dist.get_world_size(tp_group), 2, rows.numel(), device=hidden.device,
                               dtype=torch.float32)
        dist.all_gather(list(gathered.unbind(0)), torch.stack([lse, target_logit]), group=tp_group)
        lse, target_logit = torch.logsumexp(gathered[:, 0], dim=0), gathered[:, 1].sum(dim=0)
    return lse, target_logit


def _ce_grads(hidden, lm_weight, targets, rows, lse, scale, vocab_start, v_valid):
    """fp32 gradients of scale * sum over `rows` of CE: ([N, H], [V_local, H])."""
    grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
    grad_weight = torch.zeros(lm_weight.shape, device=hidden.device, dtype=torch.float32)
    blocks = _blocks(hidden.device)
    grid = (triton.cdiv(rows.numel(), blocks["BLOCK_N"]), triton.cdiv(v_valid, blocks["BLOCK_V"]))
    if grid[0] * grid[1] > 0:
        _ce_backward_kernel[grid](
            hidden, lm_weight, targets, rows, lse, scale, grad_hidden, grad_weight,
            rows.numel(), hidden.shape[1], v_valid, vocab_start, hidden.stride(0), lm_weight.stride(0),
            grad_hidden.stride(0), grad_weight.stride(0),
            DOT_PRECISION=_dot_precision(hidden.dtype), num_warps=8, **blocks,
        )
    return grad_hidden, grad_weight


def _regression_residual(hidden, reg_head_weight, reg_index, reg_targets):
    """(hidden[reg_index] [R, H] fp32, prediction - target [R, E] fp32)."""
    rows = hidden[reg_index].float()
    return rows, rows @ reg_head_weight.float().t() - reg_targets.float()


class MixedLossFunction(torch.autograd.Function):
    """(ce, reg) fp32 scalars of `mixed_ce_regression_loss`; saves the inputs and O(N) row statistics."""

    @staticmethod
    def forward(ctx, hidden, lm_weight, targets, reg_head_weight, reg_index, reg_targets,
                ignore_index, valid_vocab_size, tp_group):
        v_local = lm_weight.shape[0]
        vocab_start = dist.get_rank(tp_group) * v_local if tp_group is not None else 0
        v_valid = v_local if valid_vocab_size is None else min(max(valid_vocab_size - vocab_start, 0), v_local)
        rows = (targets != ignore_index).nonzero().squeeze(1)  # [M]
        if rows.numel() > 0:  # same on every TP rank (targets are replicated), so all or none gather
            lse, target_logit = _ce_row_stats(hidden, lm_weight, targets, rows, vocab_start, v_valid, tp_group)
            ce = (lse - target_logit).mean()
        else:
            lse, ce = rows.new_empty(0, dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
        reg = hidden.new_zeros((), dtype=torch.float32)
        if reg_index.numel() > 0:
            reg = _regression_residual(hidden, reg_head_weight, reg_index, reg_targets)[1].square().mean()
        ctx.save_for_backward(hidden, lm_weight, targets, reg_head_weight, reg_index, reg_targets, rows, lse)
        ctx.vocab_start, ctx.v_valid = vocab_start, v_valid
        return ce, reg

    @staticmethod
    def backward(ctx, grad_ce, grad_reg):
        hidden, lm_weight, targets, reg_head_weight, reg_index, reg_targets, rows, lse = ctx.saved_tensors
        scale = (grad_ce.float() / max(rows.numel(), 1)).reshape(1)
        grad_hidden, grad_lm_weight = _ce_grads(hidden, lm_weight, targets, rows, lse, scale,
                                                ctx.vocab_start, ctx.v_valid)
        grad_head = torch.zeros_like(reg_head_weight, dtype=torch.float32)
        grad_reg_targets = None
        if reg_index.numel() > 0:
            reg_rows, residual = _regression_residual(hidden, reg_head_weight, reg_index, reg_targets)
            grad_pred = residual * (2.0 * grad_reg.float() / residual.numel())  # [R, E]
            grad_hidden.index_add_(0, reg_index, grad_pred @ reg_head_weight.float())
            grad_head = grad_pred.t() @ reg_rows
            if ctx.needs_input_grad[5]:
                grad_reg_targets = (-grad_pred).to(reg_targets.dtype)
        return (grad_hidden.to(hidden.dtype), grad_lm_weight.to(lm_weight.dtype), None,
                grad_head.to(reg_head_weight.dtype), None, grad_reg_targets, None, None, None)


def mixed_ce_regression_loss(
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
    """Fused Triton loss, same signature and semantics as `mixed_ce_regression_loss_reference` (module
    docstring). hidden [N, H] and lm_weight [V_local, H] share one dtype (fp16, bf16 or fp32); the
    regression inputs may be any float dtype. Gradients come back in each input's dtype. CUDA tensors,
    or CPU under TRITON_INTERPRET=1. Returns (total, ce, reg) fp32 scalars."""
    if hidden.dim() != 2 or lm_weight.dim() != 2 or lm_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"expected hidden [N, H] and lm_weight [V, H]; got {tuple(hidden.shape)}, "
                         f"{tuple(lm_weight.shape)}")
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32) or lm_weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and lm_weight must share one of fp16/bf16/fp32; got {hidden.dtype}, "
                         f"{lm_weight.dtype}")
    if not hidden.is_cuda and isinstance(_ce_forward_kernel, triton.JITFunction):
        raise RuntimeError("mixed_ce_regression_loss needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                           "imported); use mixed_ce_regression_loss_reference on CPU")
    ce, reg = MixedLossFunction.apply(hidden.contiguous(), lm_weight.contiguous(), targets, reg_head_weight,
                                      reg_index, reg_targets, ignore_index, valid_vocab_size, tp_group)
    return ce_loss_weight * ce + reg_loss_weight * reg, ce, reg
