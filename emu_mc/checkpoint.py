"""Checkpoints: sharded, atomic, the last K kept, resumed exactly.

Layout under `<out_dir>/checkpoints/`:
  step_000100/                 model + optimizer (megatron-core dist_checkpointing, sharded per rank)
  step_000100/rank_00000.pt    this rank's RNG states and data-loader state
  step_000100/meta.json        step, world layout, config
  latest                       the name of the newest complete checkpoint
A checkpoint is written as `step_N.tmp/`, flushed to disk (fsync) and renamed only after every rank
has finished, then `latest` is replaced atomically (os.replace): a crash mid-save, or a power loss
after it, never leaves a half-written latest.

A stop signal must not break the save it triggers. Sent to a worker's process group (SLURM
preemption, a harness's timeout), SIGTERM also reaches megatron's writer helpers: the spawned
multiprocessing Manager that carries their results (it dies: BrokenPipeError / ConnectionRefusedError)
and the processes it forks to write the files. So the results travel through an in-process queue (the
save is synchronous: written and read in this process) and the forked writers ignore SIGTERM and
SIGINT (`_shield_writers`).
"""
import json
import logging
import os
import random
import queue
import shutil
import signal
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("emu_mc.checkpoint")


class CheckpointLoadError(RuntimeError):
    """The latest checkpoint cannot be read (damaged or incomplete files)."""


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


def optimizer_checkpoint_format(requested: str) -> str:
    """TrainConfig.optimizer_checkpoint -> the megatron DistributedOptimizer sharding type to use."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    if requested == "auto":
        return "fully_reshardable" if HAVE_APEX_OR_TE else "dp_reshardable"
    if requested == "fully_reshardable" and not HAVE_APEX_OR_TE:
        raise ValueError("train.optimizer_checkpoint: fully_reshardable needs apex or transformer-engine's fused "
                         "Adam (megatron-core cannot reload torch.optim.Adam state in that format); "
                         "use auto or dp_reshardable")
    return requested


def training_state(model_chunks, optimizer, optimizer_format: str, is_loading: bool = False) -> Dict[str, Any]:
    """The sharded (megatron dist_checkpointing) state of this rank's model stage and optimizer.

    `optimizer_format` is a megatron DistributedOptimizer sharding type (`optimizer_checkpoint_format`);
    it must be the same when saving and loading."""
    from emu_mc.parallel.setup import unwrap

    if len(model_chunks) != 1:
        raise NotImplementedError("checkpointing supports one model chunk per rank (no virtual pipeline stages)")
    if is_loading:
        _allocate_optimizer_state(optimizer)
    metadata = {"distrib_optim_sharding_type": optimizer_format}
    model_state = unwrap(model_chunks[0]).sharded_state_dict(metadata=metadata)
    return {"model": model_state,
            "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)}


def _allocate_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer its (zero) Adam state before a checkpoint is loaded into it.

    megatron-core's DistributedOptimizer.sharded_state_dict reads the inner torch optimizer's
    per-parameter `step` (without apex/TE), which a never-stepped optimizer lacks. One step with zero
    gradients at lr = weight_decay = 0 allocates the state and leaves every parameter unchanged;
    the checkpoint then overwrites it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if not isinstance(opt, DistributedOptimizer) or len(inner.state) > 0:
            continue
        saved = [(group["lr"], group["weight_decay"]) for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = group["weight_decay"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for group, (lr, weight_decay) in zip(inner.param_groups, saved):
            group["lr"], group["weight_decay"] = lr, weight_decay


def load_training_state(model_chunks, optimizer, state: Dict[str, Any]) -> None:
    """Put a loaded `training_state` into the model and optimizer."""
    from emu_mc.parallel.setup import unwrap

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    unwrap(model_chunks[0]).load_state_dict(state["model"])
    with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
        optimizer.load_state_dict(state["optimizer"])
    # megatron-core 0.16 with torch.optim.Adam (no apex/TE) restores the iteration count into each param
    # group's "step" but not into the per-parameter "step" tensors that Adam's bias correction reads
    # (where it does set them, all parameters share one tensor, which Adam then increments once per
    # parameter). Give every parameter its own tensor holding the restored count.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                param_state = opt.optimizer.state.get(param, {})
                if "step" in group and isinstance(param_state.get("step"), torch.Tensor):
                    param_state["step"] = torch.full_like(param_state["step"], group["step"])


_saving = False  # set while this process writes a checkpoint: the writers it forks ignore stop signals


def _ignore_stop_signals_while_saving() -> None:
    if _saving:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _shield_writers() -> None:
    """Keep megatron-core's synchronous checkpoint writers alive under SIGTERM / SIGINT.

    Its results queue (`filesystem_async._results_queue`, a module global created on first use) is by
    default a proxy to a spawned Manager process that a signal to the process group kills; a plain
    queue.Queue serves as well, since a synchronous save puts and gets in this process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


os.register_at_fork(after_in_child=_ignore_stop_signals_while_saving)


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
        global _saving
        _shield_writers()
        _saving = True
        try:
            dist_checkpointing.save(sharded_state_dict, tmp)
        finally:
            _saving = False
        torch.save(rank_state, os.path.join(tmp, f"rank_{rank:05d}.pt"))
        dist.barrier()
        if rank == 0:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"step": step, "world_size": dist.get_world_size(), **meta}, f, indent=1, default=str)
            _fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer_tmp = os.path.join(self.root, "latest.tmp")
            with open(pointer_tmp, "w") as f:
                f.write(self._name(step))
                f.flush()
                os.fsync(f.fileno())
            os.replace(pointer_tmp, os.path.join(self.root, "latest"))
            _fsync_dir(self.root)
            self._prune()
            log.info("saved checkpoint %s", final)
        dist.barrier()
        return final

    def _prune(self) -> None:
        done = sorted(d for d in os.listdir(self.root) if d.startswith("step_") and not d.endswith(".tmp"))
        for old in done[: max(len(done) - self.keep, 0)]:
            shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)

    def read_meta(self, path: str) -> Dict[str, Any]:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f)

    def load(self, path: str, sharded_state_dict: Dict[str, Any], same_layout: bool):
        """Collective. Returns (loaded state dict, this rank's rank_state or None, meta).

        Model and optimizer reshard; the per-rank data-loader and RNG states come back only when the
        checkpoint was written by the same TP x PP x DP layout (`same_layout`), else None."""
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        meta = self.read_meta(path)
        try:
            state = dist_checkpointing.load(sharded_state_dict, path)
            rank_state = None
            if same_layout:
                rank_state = torch.load(os.path.join(path, f"rank_{dist.get_rank():05d}.pt"), weights_only=False)
        except (Exception, CheckpointException) as err:
            others = sorted(d for d in os.listdir(self.root) if d.startswith("step_") and not d.endswith(".tmp"))
            cause = (str(err).strip().splitlines() or [type(err).__name__])[-1]  # torch's lists a traceback per rank
            raise CheckpointLoadError(
                f"cannot load checkpoint {path} ({cause}). To resume from an older one, "
                f"write its name into {os.path.join(self.root, 'latest')} (present: {', '.join(others)}); "
                "to start afresh, use another train.out_dir") from err
        return state, rank_state, meta


def _fsync_tree(root: str) -> None:
    """Flush every file below `root`, and the directories holding them, to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
