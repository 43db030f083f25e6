"""The decoder run's checkpointed state as megatron-core sharded tensors, written and read by the
pretraining Checkpointer (emu_mc/checkpoint.py: atomic, last K kept). Every data-parallel rank holds
the same UNet, AdamW state and EMA: each tensor is one replica per rank, and only rank 0's is written.
Keys: unet.<param>, optim.<param>.{step,exp_avg,exp_avg_sq}, ema.<param>.
"""
from typing import Dict, Optional

import torch


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


def sharded(tensors: Dict[str, torch.Tensor], replica: int) -> Dict:
    """{key: ShardedTensor}: each tensor whole, this process's copy being replica `replica`."""
    from megatron.core.dist_checkpointing import ShardedTensor

    return {key: ShardedTensor.from_rank_offsets(key, t, replica_id=replica) for key, t in tensors.items()}


@torch.no_grad()
def copy_loaded(tensors: Dict[str, torch.Tensor], loaded: Dict[str, torch.Tensor]) -> None:
    """Write a loaded state (same keys) into the live tensors."""
    for key, target in tensors.items():
        target.copy_(loaded[key].view_as(target))


@torch.no_grad()
def update_ema(ema: Dict[str, torch.Tensor], unet, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * weights, parameter by parameter (fp32)."""
    for name, param in unet.named_parameters():
        ema[name].lerp_(param.detach().float(), 1.0 - decay)
