"""Data parallelism for the UNet being trained (decoder.parallel): DDP, every rank a full replica, or
FSDP (torch's FSDP2, `fully_shard`), every rank holding a dim-0 shard of each parameter, gradient and
AdamW / EMA state, the whole weights gathered one UNet block at a time for forward and backward.

Both average gradients over ranks, so a step is the same update; checkpoints do not depend on the choice
(emu_mc/decoder/state.py writes each tensor by its global rows).
"""
import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def wrap_unet(unet: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """The module to call for the loss. ddp: a DistributedDataParallel wrapper (world > 1), `unet` itself
    (world 1). fsdp: `unet`, changed in place: each down/mid/up block and then the root are fully_shard-ed
    over all ranks, so its parameters become DTensors sharded on dim 0. Build the optimizer and EMA after."""
    world = dist.get_world_size()
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        blocks = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(unet, mesh=mesh)
        return unet
    if world == 1:
        return unet
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective for a DTensor: every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so their global L2 norm is at most `max_norm` (inf = measure only); returns the
    norm before clipping. With FSDP the norm covers every rank's shards (collective)."""
    params = [p for p in params if p.grad is not None]
    total = full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params]))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def row_shard(t: DTensor):
    """(first global row, local rows) of this rank's dim-0 shard of `t` (torch.chunk's split, as FSDP)."""
    rows, ranks = t.shape[0], t.device_mesh.size()
    per_rank = math.ceil(rows / ranks)
    start = min(t.device_mesh.get_local_rank() * per_rank, rows)
    local = t.to_local()
    assert local.shape[0] == min(per_rank, rows - start), "not a dim-0 FSDP shard"
    return start, local
