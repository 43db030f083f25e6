"""Checkpoints: sharded, atomic, the last K kept, resumed exactly.

Layout under `<out_dir>/checkpoints/`:
  step_000100/                 model + optimizer (megatron-core dist_checkpointing, sharded per rank)
  step_000100/rank_00000.pt    this rank's RNG states and data-loader state
  step_000100/meta.json        step, world layout, config
  latest                       the name of the newest complete checkpoint
A checkpoint is written as `step_N.tmp/` and renamed only after every rank has finished, then
`latest` is replaced atomically (os.replace): a crash mid-save never leaves a half-written latest.
"""
import json
import logging
import os
import random
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("emu_mc.checkpoint")


def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (CPU and CUDA) and megatron's model-parallel RNG tracker states."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


class Checkpointer:
    def __init__(self, out_dir: str, keep: int):
        self.root = os.path.join(out_dir, "checkpoints")
        self.keep = keep

    @staticmethod
    def _name(step: int) -> str:
        return f"step_{step:06d}"

    def latest(self) -> Optional[str]:
        """Path of the newest complete checkpoint, or None."""
        pointer = os.path.join(self.root, "latest")
        if not os.path.exists(pointer):
            return None
        with open(pointer) as f:
            path = os.path.join(self.root, f.read().strip())
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{pointer} names {path}, which does not exist")
        return path

    def save(self, step: int, sharded_state_dict: Dict[str, Any], rank_state: Dict[str, Any],
             meta: Dict[str, Any]) -> str:
        """Collective: every rank calls it. Returns the final checkpoint path."""
        from megatron.core import dist_checkpointing

        rank = dist.get_rank()
        final = os.path.join(self.root, self._name(step))
        tmp = final + ".tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        dist_checkpointing.save(sharded_state_dict, tmp)
        torch.save(rank_state, os.path.join(tmp, f"rank_{rank:05d}.pt"))
        dist.barrier()
        if rank == 0:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"step": step, "world_size": dist.get_world_size(), **meta}, f, indent=1, default=str)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer_tmp = os.path.join(self.root, "latest.tmp")
            with open(pointer_tmp, "w") as f:
                f.write(self._name(step))
                f.flush()
                os.fsync(f.fileno())
            os.replace(pointer_tmp, os.path.join(self.root, "latest"))
            self._prune()
            log.info("saved checkpoint %s", final)
        dist.barrier()
        return final

    def _prune(self) -> None:
        done = sorted(d for d in os.listdir(self.root) if d.startswith("step_") and not d.endswith(".tmp"))
        for old in done[: max(len(done) - self.keep, 0)]:
            shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)

    def load(self, path: str, sharded_state_dict: Dict[str, Any]):
        """Collective. Returns (loaded state dict, this rank's rank_state, meta)."""
        from megatron.core import dist_checkpointing

        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if meta["world_size"] != dist.get_world_size():
            raise RuntimeError(
                f"{path} was written by {meta['world_size']} ranks, this run has {dist.get_world_size()}: "
                "model and optimizer reshard, but the per-rank data-loader and RNG states do not; "
                "resume with the same world size"
            )
        state = dist_checkpointing.load(sharded_state_dict, path)
        rank_state = torch.load(os.path.join(path, f"rank_{dist.get_rank():05d}.pt"), weights_only=False)
        return state, rank_state, meta
