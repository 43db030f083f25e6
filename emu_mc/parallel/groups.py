"""Process groups: torch.distributed + megatron-core parallel_state, in one call.

Works from torchrun (env:// rendezvous) and in a plain single process (world of 1). NCCL with CUDA,
gloo without; on CPU the megatron compatibility layer (cpu_compat) is enabled first.
"""
import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from emu_mc.parallel import cpu_compat

log = logging.getLogger("emu_mc.parallel")


@dataclass(frozen=True)
class ParallelDims:
    world: int
    tp: int
    pp: int

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def check(self) -> None:
        if self.world % (self.tp * self.pp) != 0:
            raise ValueError(
                f"world size {self.world} does not factor into tensor_parallel ({self.tp}) x "
                f"pipeline_parallel ({self.pp}) x data_parallel; choose tp*pp dividing {self.world}"
            )


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: int = 600) -> ParallelDims:
    """Initialise torch.distributed (if needed) and megatron's TP/PP/DP groups; seed the RNG tracker."""
    from megatron.core import parallel_state, tensor_parallel

    cpu_compat.enable()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain single process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    dims = ParallelDims(world=dist.get_world_size(), tp=tp, pp=pp)
    dims.check()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dims


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_groups_torn_down():
    """Destroy, on leaving, the process groups set up inside the block; a world that already existed
    (a caller's in the same process, e.g. a test's) is left as it was."""
    ours = not dist.is_initialized()
    try:
        yield
    finally:
        if ours:
            destroy_distributed()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
