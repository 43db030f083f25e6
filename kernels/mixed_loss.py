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
With `tp_group` (vocab-parallel), rank r holds vocab ids [r * V_local, (r + 1) * V_local) and regression
rows [r * R // tp, (r + 1) * R // tp) of reg_index. Every rank returns the same (full) ce and reg; the
gradient of `hidden` (and of reg_targets) on a rank is a partial sum, its vocab shard's share of the CE
term plus its regression rows, which the caller sums over the ranks (megatron's copy-to-TP region does,
see EmuModel.loss) to get exactly the TP = 1 gradient; the gradient of reg_head_weight is complete on
every rank (summed inside). Empty terms have value 0 and zero gradients.

This file holds the plain PyTorch reference `mixed_ce_regression_loss_reference` (materialises the
[N, V] logits: the fallback and the ground truth of the tests) and the fused op `mixed_ce_regression_loss`
(same signature and semantics; fp16, bf16 or fp32), which never holds more than one chunk of logits.

Design (v2): chunked, gradients computed in the forward (the Liger-Kernel scheme), GEMMs on cuBLAS.
  forward, per chunk of rows (all rows, or the rows of `text_index` when the caller knows them: skipping
  ignored rows takes their count on the host, which the op itself never asks for):
    logits = hidden_chunk @ W^T                      cuBLAS, input dtype out (fp32 accumulate)
    _row_ce_kernel (one rank holds the vocabulary): per row, max and sum exp (fp32, online), the CE, and
      the row overwritten in place with softmax - onehot(target) (0 in padded columns and ignored rows),
      rounded once to the input dtype: one program reads its row twice, the second time from L2
    with tp_group the same in two kernels around the combine of the ranks' stats: _row_stats_kernel (max,
      sum exp, target logit of this shard), all-reduce max, rescale, all-reduce sum, _logit_grad_kernel
    grad_hidden[chunk] = grad_logits @ W;  grad_W (=, then +=) grad_logits^T @ hidden_chunk (addmm in place)
  regression, this rank's rows: residual = hidden[rows] @ head^T - targets (matmul in the input
    dtype, residual fp32); grads residual @ head and residual^T @ hidden[rows] in the input dtype; with
    tp_group the sum of squares and the head's gradient are all-reduced.
  The gradients are kept unscaled (softmax - onehot, residual): backward multiplies them in place by
  grad_ce / num_valid and grad_reg * 2 / (R E), device scalars, so nothing syncs with the host and
  fp16 gradients do not underflow before the GEMMs (sums over rows must stay below fp16's 65504).
  Backward therefore runs once per forward.
Why this and not Cut Cross-Entropy's recompute-in-backward: the three N x V x H products (5.4 TFLOP
each at N = 16384, V = 32000, H = 5120) are the whole cost; cuBLAS runs them at tensor-core peak, while
a fused Triton tile kernel has to match it with wgmma and then reduce grad_W over row blocks (locks or a
second pass) and recompute the logits (a fourth product); CCE measured 2.9x eager on the H100 here,
Liger's chunked scheme 0.83x. The Triton part is the memory-bound row pass: at most two reads and one
write of each chunk from HBM (3 GiB at N = 16384, V = 32000 bf16: ~1 ms on an H100; the one-rank kernel's
second read mostly hits L2).
Chunk size: rows such that a chunk of logits takes <= 128 MiB (2048 rows at V = 32000 bf16). The
memory target is Cut Cross-Entropy's peak + 128 MiB, and the returned gradients (hidden, W, head: 522
MiB at N = 16384) are most of that peak, so the chunk is the budget left; 2048 x 32000 outputs are still
~15 waves of 128 x 256 tiles on 132 SMs, enough for cuBLAS to run at full rate. grad_W accumulates in
the weight's dtype (one rounding per chunk: 8 at N = 16384): an fp32 accumulator would be 625 MiB.
Tile sizes are fixed, not autotuned: the row pass is bandwidth-bound, 4096-column blocks with 8 warps
stream a row in 8 steps at V = 32000 and every choice near it moves the same bytes.
"""
from typing import Optional, Tuple

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


class _SumGradOverGroup(torch.autograd.Function):
    """Identity in forward; the gradient is summed across `group` (a weight replicated on every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def regression_rows(num_rows: int, tp_group: Optional[dist.ProcessGroup]) -> Tuple[int, int]:
    """[begin, end) of the regression rows (positions in reg_index) this rank computes: all without
    tp_group, else the rank's contiguous share (R // tp or one more)."""
    if tp_group is None:
        return 0, num_rows
    rank, world = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    return rank * num_rows // world, (rank + 1) * num_rows // world


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
    text_index: Optional[torch.Tensor] = None,
):
    """Eager reference; see the module docstring. Returns (total, ce, reg) fp32 scalars. `text_index` (a
    hint for the fused op: which rows to run the CE over) does not change the result and is not used."""
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
        begin, end = regression_rows(reg_index.numel(), tp_group)
        head = reg_head_weight if tp_group is None else _SumGradOverGroup.apply(reg_head_weight, tp_group)
        pred = hidden[reg_index[begin:end]].float() @ head.float().t()  # [R_rank, E]
        squares = (pred - reg_targets[begin:end].float()).square().sum()
        if tp_group is not None:
            squares = _AllReduceSum.apply(squares, tp_group)
        reg = squares / reg_targets.numel()
    else:
        reg = hidden.float().sum() * 0.0  # keeps the graph connected, value exactly 0
    total = ce_loss_weight * ce + reg_loss_weight * reg
    return total, ce, reg


# Vocabulary sizes are constexprs (fixed for a run): a loop bound passed as a runtime int breaks triton
# 3.6's interpreter (it converts the bound from a 1-element numpy array).
@triton.jit
def _row_max_sum_exp(row_logits, V_VALID: tl.constexpr, BLOCK_V: tl.constexpr):
    """(max, sum of exp(logit - max)) fp32 over the first V_VALID columns of one row (-inf and 0 when
    V_VALID is 0), online over BLOCK_V-column blocks."""
    row_max = float("-inf")
    sum_exp = 0.0
    for v in range(0, V_VALID, BLOCK_V):  # every block holds >= 1 valid column: block_max is finite
        cols = v + tl.arange(0, BLOCK_V)
        z = tl.load(row_logits + cols, mask=cols < V_VALID, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(z, axis=0))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        row_max = new_max
    return row_max, sum_exp


@triton.jit
def _target_logit(row_logits, targets_ptr, row, vocab_start, ignore_index, V_VALID: tl.constexpr):
    """(the row's target column in this shard, whether the row has a target, its logit fp32 when this
    shard holds it, else 0)."""
    target = tl.load(targets_ptr + row)
    local = target - vocab_start
    owned = (target != ignore_index) & (local >= 0) & (local < V_VALID)
    target_logit = tl.load(row_logits + tl.where(owned, local, 0), mask=owned, other=0.0).to(tl.float32)
    return local, target != ignore_index, target_logit


@triton.jit
def _write_row_grad(row_logits, local, valid, lse, V_LOCAL: tl.constexpr, V_VALID: tl.constexpr,
                    BLOCK_V: tl.constexpr):
    """Overwrites one row of logits with softmax - onehot(local) (fp32 from the row's lse, rounded to the
    logits' dtype); 0 in columns >= V_VALID and everywhere when not `valid`."""
    for v in range(0, V_LOCAL, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        z = tl.load(row_logits + cols, mask=cols < V_LOCAL, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - tl.where(cols == local, 1.0, 0.0)
        grad = tl.where((cols < V_VALID) & valid, grad, 0.0)
        tl.store(row_logits + cols, grad.to(row_logits.dtype.element_ty), mask=cols < V_LOCAL)


@triton.jit
def _row_ce_kernel(logits_ptr, targets_ptr, ce_ptr, stride_logits, ignore_index, V: tl.constexpr,
                   V_VALID: tl.constexpr, BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """One rank holds the whole vocabulary. Program i reads row i of a logits chunk [rows, V] (input
    dtype), writes its CE (fp32, 0 for an ignored row) to ce_ptr[i] and, with WRITE_GRAD, overwrites
    the row with its unscaled gradient softmax - onehot(target) (as `_write_row_grad`). The second pass
    over the row follows the first within the program, so it reads the row from L2 rather than HBM."""
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * stride_logits
    row_max, sum_exp = _row_max_sum_exp(row_logits, V_VALID, BLOCK_V)
    local, valid, target_logit = _target_logit(row_logits, targets_ptr, row, 0, ignore_index, V_VALID)
    lse = row_max + tl.log(sum_exp)
    tl.store(ce_ptr + row, tl.where(valid, lse - target_logit, 0.0))
    if WRITE_GRAD:
        _write_row_grad(row_logits, local, valid, lse, V, V_VALID, BLOCK_V)


@triton.jit
def _row_stats_kernel(logits_ptr, targets_ptr, max_ptr, sum_exp_ptr, target_logit_ptr, stride_logits,
                      vocab_start, ignore_index, V_VALID: tl.constexpr, BLOCK_V: tl.constexpr):
    """Vocab-parallel pass 1. Program i reads row i of a logits chunk [rows, V_local] (input dtype) and
    writes, fp32: the max and the sum of exp(logit - max) over this shard's columns below V_VALID, and
    the logit of the row's target when this shard holds it, else 0."""
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * stride_logits
    row_max, sum_exp = _row_max_sum_exp(row_logits, V_VALID, BLOCK_V)
    _, _, target_logit = _target_logit(row_logits, targets_ptr, row, vocab_start, ignore_index, V_VALID)
    tl.store(max_ptr + row, row_max)
    tl.store(sum_exp_ptr + row, sum_exp)
    tl.store(target_logit_ptr + row, target_logit)


@triton.jit
def _logit_grad_kernel(logits_ptr, targets_ptr, lse_ptr, stride_logits, vocab_start, ignore_index,
                       V_LOCAL: tl.constexpr, V_VALID: tl.constexpr, BLOCK_V: tl.constexpr):
    """Vocab-parallel pass 2. Program i overwrites row i of a logits chunk [rows, V_local] with the
    unscaled gradient of the row's CE (`_write_row_grad`) from the row's global logsumexp lse [rows]."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    _write_row_grad(logits_ptr + row * stride_logits, target - vocab_start, target != ignore_index, lse,
                    V_LOCAL, V_VALID, BLOCK_V)


def _launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta): the one place kernels start (tests and the sm_90 compile harness
    hook it)."""
    kernel[grid](*args, **meta)


_CHUNK_BYTES_CUDA = 128 * 2 ** 20  # logits per chunk (module docstring)
_CHUNK_ROWS_INTERPRETER = 32  # small test shapes span several chunks
_BLOCK_V_INTERPRETER = 128  # ... and several vocab blocks per row


def _chunk_rows(v_local: int, element_size: int, device: torch.device) -> int:
    """Rows per chunk: logits within _CHUNK_BYTES_CUDA (a multiple of 128 rows, >= 128) on CUDA."""
    if device.type != "cuda":
        return _CHUNK_ROWS_INTERPRETER
    return max(128, _CHUNK_BYTES_CUDA // (v_local * element_size) // 128 * 128)


def _row_kernel_meta(v_local: int, device: torch.device) -> dict:
    """BLOCK_V and num_warps of the two row kernels (fixed choice: module docstring)."""
    if device.type != "cuda":
        return dict(BLOCK_V=_BLOCK_V_INTERPRETER)
    block_v = min(4096, triton.next_power_of_2(v_local))
    return dict(BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)


def _combine_over_ranks(stats, group):
    """stats [3, rows] fp32 (max, sum exp, target logit) of each rank's shard -> the global ones, in
    place on every rank."""
    global_max = stats[0].clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    stats[1].mul_(torch.exp(stats[0] - global_max))  # a shard without valid columns: exp(-inf) = 0
    stats[0].copy_(global_max)
    dist.all_reduce(stats[1:], group=group)


def _cross_entropy_chunks(hidden, lm_weight, targets, ignore_index, vocab_start, v_valid, tp_group,
                          grad_hidden, grad_lm_weight, text_index=None):
    """CE per row fp32 (0 for ignored rows), chunk by chunk, over all N rows, or over the rows
    `text_index` [T] lists (then [T]). When given, fills grad_hidden [N, H] with d(sum of CE)/d hidden
    (with text_index only its rows: the rest must be zeros on entry) and overwrites grad_lm_weight
    [V_local, H] with d(sum of CE)/d W, both in the input dtype, unscaled (not divided by the number
    of valid rows)."""
    num_rows, v_local = hidden.shape[0] if text_index is None else text_index.numel(), lm_weight.shape[0]
    chunk = max(1, min(num_rows, _chunk_rows(v_local, hidden.element_size(), hidden.device)))
    meta = _row_kernel_meta(v_local, hidden.device)
    logits_buffer = hidden.new_empty(chunk, v_local)
    ce_rows = hidden.new_empty(num_rows, dtype=torch.float32)
    write_grad = grad_hidden is not None or grad_lm_weight is not None
    for begin in range(0, num_rows, chunk):
        end = min(begin + chunk, num_rows)
        if text_index is None:
            rows_hidden, rows_targets = hidden[begin:end], targets[begin:end]
        else:
            rows = text_index[begin:end]
            rows_hidden, rows_targets = hidden.index_select(0, rows), targets.index_select(0, rows)
        logits = torch.mm(rows_hidden, lm_weight.t(), out=logits_buffer[:end - begin])  # [rows, V_local]
        if tp_group is None:
            _launch(_row_ce_kernel, (end - begin,), logits, rows_targets, ce_rows[begin:end], logits.stride(0),
                    ignore_index, V=v_local, V_VALID=v_valid, WRITE_GRAD=write_grad, **meta)
        else:
            stats = hidden.new_empty(3, end - begin, dtype=torch.float32)  # max, sum exp, target logit
            _launch(_row_stats_kernel, (end - begin,), logits, rows_targets, stats[0], stats[1], stats[2],
                    logits.stride(0), vocab_start, ignore_index, V_VALID=v_valid, **meta)
            _combine_over_ranks(stats, tp_group)
            lse = stats[0] + stats[1].log()
            ce_rows[begin:end] = torch.where(rows_targets != ignore_index, lse - stats[2], 0.0)
            if write_grad:
                _launch(_logit_grad_kernel, (end - begin,), logits, rows_targets, lse, logits.stride(0),
                        vocab_start, ignore_index, V_LOCAL=v_local, V_VALID=v_valid, **meta)
        if not write_grad:
            continue
        if grad_hidden is not None and text_index is None:
            torch.mm(logits, lm_weight, out=grad_hidden[begin:end])
        elif grad_hidden is not None:
            grad_hidden.index_copy_(0, rows, torch.mm(logits, lm_weight))
        if grad_lm_weight is not None:  # beta 0: the first chunk overwrites the (uninitialised) buffer
            grad_lm_weight.addmm_(logits.t(), rows_hidden, beta=0 if begin == 0 else 1)
    if grad_lm_weight is not None and num_rows == 0:
        grad_lm_weight.zero_()
    return ce_rows


def _regression(hidden, reg_head_weight, reg_index, reg_targets, tp_group, needs_grad):
    """This rank's regression rows (`regression_rows`): (sum of squared residuals over all ranks, 0-dim
    fp32; rows [R_rank] of hidden; unscaled gradients of the sum of squares / 2 w.r.t. hidden[rows]
    [R_rank, H], reg_head_weight [E, H] (summed over ranks) and reg_targets [R, E] fp32 (zero outside
    this rank's rows), each None unless `needs_grad` (hidden, head, targets) asks for it). Matmuls in
    hidden's dtype."""
    begin, end = regression_rows(reg_index.numel(), tp_group)
    rows = reg_index[begin:end]
    rows_hidden = hidden[rows]  # [R_rank, H]
    head = reg_head_weight.to(hidden.dtype)
    residual = torch.mm(rows_hidden, head.t()).float().sub_(reg_targets[begin:end].float())  # [R_rank, E]
    squares = torch.dot(residual.view(-1), residual.view(-1))
    grad_rows = grad_head = grad_targets = None
    if needs_grad[2]:
        grad_targets = residual.new_zeros(reg_targets.shape)
        grad_targets[begin:end] = -residual
    residual = residual.to(hidden.dtype)
    if needs_grad[0]:
        grad_rows = torch.mm(residual, head)
    if needs_grad[1]:
        grad_head = torch.mm(residual.t(), rows_hidden)
    if tp_group is not None:
        dist.all_reduce(squares, group=tp_group)
        if grad_head is not None:
            dist.all_reduce(grad_head, group=tp_group)
    return squares, rows, grad_rows, grad_head, grad_targets


class MixedLossFunction(torch.autograd.Function):
    """(ce, reg) fp32 scalars of `mixed_ce_regression_loss`. Gradients are computed in forward and
    saved (unscaled); backward scales them in place, so it runs once."""

    @staticmethod
    def forward(ctx, hidden, lm_weight, targets, reg_head_weight, reg_index, reg_targets,
                ignore_index, valid_vocab_size, tp_group, needs_grad, text_index):
        v_local = lm_weight.shape[0]
        vocab_start = dist.get_rank(tp_group) * v_local if tp_group is not None else 0
        v_valid = v_local if valid_vocab_size is None else min(max(valid_vocab_size - vocab_start, 0), v_local)
        need_hidden, need_lm_weight, need_head, need_reg_targets = needs_grad
        reg_count = reg_targets.numel()
        reg = hidden.new_zeros((), dtype=torch.float32)
        reg_grads = (None,) * 4
        if reg_index.numel() > 0:  # the regression first: its temporaries are gone before the CE chunks
            squares, rows, *grads = _regression(hidden, reg_head_weight, reg_index, reg_targets, tp_group,
                                                (need_hidden, need_head, need_reg_targets))
            reg = squares / reg_count
            reg_grads = (rows, *grads)

        grad_hidden = None
        if need_hidden:
            grad_hidden = torch.empty_like(hidden) if text_index is None else torch.zeros_like(hidden)
        grad_lm_weight = torch.empty_like(lm_weight) if need_lm_weight else None
        ce_rows = _cross_entropy_chunks(hidden, lm_weight, targets, ignore_index, vocab_start, v_valid,
                                        tp_group, grad_hidden, grad_lm_weight, text_index)
        num_valid = (targets != ignore_index).sum().clamp_(min=1)
        ce = ce_rows.sum() / num_valid
        ctx.save_for_backward(num_valid, grad_hidden, grad_lm_weight, *reg_grads)
        ctx.reg_count, ctx.head_dtype, ctx.reg_targets_dtype = reg_count, reg_head_weight.dtype, reg_targets.dtype
        ctx.head_shape = reg_head_weight.shape if need_head else None
        return ce, reg

    @staticmethod
    def backward(ctx, grad_ce, grad_reg):
        num_valid, grad_hidden, grad_lm_weight, rows, grad_rows, grad_head, grad_targets = ctx.saved_tensors
        ce_scale = grad_ce.float() / num_valid
        reg_scale = grad_reg.float() * (2.0 / max(ctx.reg_count, 1))
        # multi-tensor muls: a mul_ by a 0-dim CUDA tensor takes PyTorch's unvectorised elementwise kernel
        # (H100 profile: 1.2 ms for these tensors at N = 16384, V = 32000)
        for grads, scale in (((grad_hidden, grad_lm_weight), ce_scale),
                             ((grad_rows, grad_head, grad_targets), reg_scale)):
            grads = [g for g in grads if g is not None]
            if grads:
                torch._foreach_mul_(grads, scale)
        if grad_hidden is not None and grad_rows is not None:
            grad_hidden.index_add_(0, rows, grad_rows)
        if grad_head is not None:
            grad_head = grad_head.to(ctx.head_dtype)
        elif ctx.head_shape is not None:  # no regression rows: zeros, like the reference's unused head
            grad_head = grad_ce.new_zeros(ctx.head_shape, dtype=ctx.head_dtype)
        if grad_targets is not None:
            grad_targets = grad_targets.to(ctx.reg_targets_dtype)
        return grad_hidden, grad_lm_weight, None, grad_head, None, grad_targets, None, None, None, None, None


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
    text_index: Optional[torch.Tensor] = None,
):
    """Fused loss, same signature and semantics as `mixed_ce_regression_loss_reference` (module
    docstring). `text_index` [T] long (optional): rows of `hidden` that may have a text target, covering
    every row that does (e.g. `(targets != ignore_index).nonzero()[:, 0]`, which the caller may compute
    where a sync costs nothing): the CE GEMMs then run over these T rows only, not all N. hidden [N, H] and lm_weight [V_local, H] share one dtype (fp16, bf16 or fp32); the
    regression inputs may be any float dtype (the head is cast to hidden's for the matmuls). Gradients
    come back in each input's dtype. CUDA tensors, or CPU under TRITON_INTERPRET=1. No host
    synchronisation (CUDA-graph capturable without tp_group). Returns (total, ce, reg) fp32 scalars."""
    if hidden.dim() != 2 or lm_weight.dim() != 2 or lm_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"expected hidden [N, H] and lm_weight [V, H]; got {tuple(hidden.shape)}, "
                         f"{tuple(lm_weight.shape)}")
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32) or lm_weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and lm_weight must share one of fp16/bf16/fp32; got {hidden.dtype}, "
                         f"{lm_weight.dtype}")
    if not hidden.is_cuda and isinstance(_row_stats_kernel, triton.JITFunction):
        raise RuntimeError("mixed_ce_regression_loss needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                           "imported); use mixed_ce_regression_loss_reference on CPU")
    needs_grad = tuple(torch.is_grad_enabled() and t.requires_grad
                       for t in (hidden, lm_weight, reg_head_weight, reg_targets))
    ce, reg = MixedLossFunction.apply(hidden.contiguous(), lm_weight.contiguous(), targets.contiguous(),
                                      reg_head_weight, reg_index, reg_targets, ignore_index, valid_vocab_size,
                                      tp_group, needs_grad, text_index)
    return ce_loss_weight * ce + reg_loss_weight * reg, ce, reg
