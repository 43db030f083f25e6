"""The decoder run's checkpointed state as megatron-core sharded tensors, written and read by the
pretraining Checkpointer (emu_mc/checkpoint.py: atomic, last K kept). Keys: unet.<param>,
optim.<param>.{step,exp_avg,exp_avg_sq}, ema.<param>, each the whole tensor's global shape.

Under DDP every rank holds the same tensors: one replica per rank, only rank 0's is written. Under FSDP a
parameter's tensors are DTensors sharded on dim 0: each rank writes its own rows. The saved checkpoint is
the same either way, so a run resumes under the other mode and on any number of ranks (megatron-core
reads each rank's rows out of whatever pieces were written).
"""
import math
from typing import Dict, List, Optional, Union

import torch
from torch.distributed.tensor import DTensor


def allocate_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give parameters without AdamW state a zero one (step 0), so a checkpoint can be loaded into it."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not optimizer.state[param]:
                optimizer.state[param] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": torch.zeros_like(param)}


def decoder_tensors(unet, optimizer, ema: Optional[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Every tensor of the run's state by checkpoint key (views of the live tensors)."""
    allocate_adam_state(optimizer)
    tensors = {}
    for name, param in unet.named_parameters():
        tensors[f"unet.{name}"] = param.data
        for key, value in optimizer.state[param].items():
            tensors[f"optim.{name}.{key}"] = value.view(1) if value.dim() == 0 else value
        if ema is not None:
            tensors[f"ema.{name}"] = ema[name]
    return tensors


def row_pieces(t: DTensor):
    """(first global row, rows per piece g, views of this rank's rows cut into pieces of g rows) for a
    dim-0-sharded DTensor. g = gcd(rows per rank, rows): megatron-core places a piece by an offset that
    is a multiple of its size, and FSDP's last shards are shorter, so whole shards would not always do."""
    from emu_mc.decoder.parallel import row_shard

    start, local = row_shard(t)
    g = math.gcd(math.ceil(t.shape[0] / t.device_mesh.size()), t.shape[0])
    return start, g, list(local.split(g)) if local.shape[0] else []


def sharded(tensors: Dict[str, torch.Tensor], replica: int) -> Dict[str, Union[object, List[object]]]:
    """{key: ShardedTensor} for plain tensors (whole; this process's copy is replica `replica`), {key: [its
    row pieces]} for DTensors (replica 0: each row is written once, by the rank that holds it)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    out = {}
    for key, t in tensors.items():
        if isinstance(t, DTensor):
            start, g, pieces = row_pieces(t)
            out[key] = [ShardedTensor.from_rank_offsets(key, piece, (0, start // g + i, t.shape[0] // g),
                                                        replica_id=0) for i, piece in enumerate(pieces)]
        else:
            out[key] = ShardedTensor.from_rank_offsets(key, t, replica_id=replica)
    return out


@torch.no_grad()
def copy_loaded(tensors: Dict[str, torch.Tensor], loaded: Dict) -> None:
    """Write a loaded state (the structure `sharded` gave, tensors in place of ShardedTensors) into the
    live tensors."""
    for key, target in tensors.items():
        if isinstance(target, DTensor):  # a rank holding none of the rows has no entry
            pieces, got = row_pieces(target)[2], loaded.get(key, [])
        else:
            pieces, got = [target], [loaded[key]]
        for piece, value in zip(pieces, got, strict=True):
            piece.copy_(value.view_as(piece))


@torch.no_grad()
def update_ema(ema: Dict[str, torch.Tensor], unet, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * weights, parameter by parameter (fp32)."""
    for name, param in unet.named_parameters():
        ema[name].lerp_(param.detach().float(), 1.0 - decay)
