"""The vision side split over tensor-parallel ranks (`parallel.vision_layout: split`).

The LLM is megatron-sharded over TP; the vision encoder, ln_visual and the resampler are not: every
TP rank of the first pipeline stage holds them whole. Instead of every TP rank encoding every image of
the microbatch (the same work tp times over), TP rank r encodes only its share:
- `image_shares(n, tp)`: contiguous shares in image order, sizes differing by at most one (the first
  n % tp ranks take one more); shares are empty when n < tp, all of them when n == 0;
- `gather_image_shares`: all-gather of the shares' visual embeddings [n_r, Q, H] -> [n, Q, H]. Its
  backward keeps this rank's rows of the incoming gradient and reduces nothing: the gathered
  embeddings enter the LLM's input, which is replicated over TP, and megatron all-reduces the
  gradient of that input (column-parallel input region), so every TP rank receives the same gradient;
- each rank's vision gradients then cover its own images only: `sum_grads_over_tp` adds them up over
  the TP group (called after megatron's DP reduction, see emu_mc/parallel/setup.py), so the replicas
  see the TP = 1 gradient and stay identical.
"""
from typing import Iterable, List

import torch
import torch.distributed as dist


def image_shares(num_images: int, tp: int) -> List[int]:
    """Images encoded by each of `tp` ranks: balanced, contiguous, in rank order; sums to num_images."""
    base, extra = divmod(num_images, tp)
    return [base + (rank < extra) for rank in range(tp)]


class _GatherImageShares(torch.autograd.Function):
    """local [n_rank, ...] -> [sum(sizes), ...], shares concatenated in rank order."""

    @staticmethod
    def forward(ctx, local, sizes, rank, group):
        ctx.start, ctx.count = sum(sizes[:rank]), sizes[rank]
        most = max(sizes)
        padded = local if local.shape[0] == most else torch.cat(
            [local, local.new_zeros((most - local.shape[0],) + local.shape[1:])])
        gathered = local.new_empty((len(sizes) * most,) + local.shape[1:])
        dist.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        if all(n == most for n in sizes):
            return gathered
        return torch.cat([gathered[r * most:r * most + n] for r, n in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start:ctx.start + ctx.count], None, None, None


def gather_image_shares(local: torch.Tensor, sizes: List[int], rank: int, group) -> torch.Tensor:
    """All-gather each TP rank's visual embeddings local [sizes[rank], Q, H] (any float dtype) into
    [sum(sizes), Q, H] in image order; differentiable (backward: this rank's rows). Collective over
    `group`: every rank calls it with the same `sizes`."""
    return _GatherImageShares.apply(local, sizes, rank, group)


def _contiguous_runs(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """1-D views covering the contiguous `tensors`, merged where they lie back to back in one storage
    (megatron's DDP keeps every main_grad in one flat buffer): fewer, larger collectives, no copies."""
    ordered = sorted(tensors, key=lambda t: (t.untyped_storage().data_ptr(), t.storage_offset()))
    runs, views = [], []
    for t in ordered:
        last = runs[-1] if runs else None
        if (last is not None and last[0].untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                and last[0].dtype == t.dtype and last[1] + last[2] == t.storage_offset()):
            last[2] += t.numel()
        else:
            runs.append([t, t.storage_offset(), t.numel()])
    for t, offset, numel in runs:
        views.append(torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), offset, (numel,)))
    return views


def sum_grads_over_tp(params: Iterable[torch.nn.Parameter], group) -> None:
    """Sum the gradients (`main_grad` under megatron's DDP, else `.grad`) of `params` over `group`,
    in place. Collective over `group`; a rank whose share was empty contributes zeros."""
    if dist.get_world_size(group) == 1:
        return
    grads = []
    for p in params:
        if not p.requires_grad:
            continue
        if not hasattr(p, "main_grad") and p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.main_grad if hasattr(p, "main_grad") else p.grad)
    for view in _contiguous_runs(grads):
        dist.all_reduce(view, group=group)
