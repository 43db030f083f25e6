"""Worker for tests/decoder/test_parallel.py, under torchrun (2 gloo ranks): decoder training under DDP and
under FSDP, 4 steps each with checkpoints at steps 2 and 4, then three runs resumed from a step-2
checkpoint: FSDP from FSDP's (exact resume), DDP from FSDP's and FSDP from DDP's (the checkpoint loads
under the other mode). Every run's out_dir is under OUT: ddp, fsdp, fsdp_resumed, fsdp_to_ddp, ddp_to_fsdp.
First, tensors whose rows do not split evenly over the ranks (5 rows, 1 row) go through the checkpoint's
row pieces and come back whole and as shards.

    torchrun --nproc_per_node=2 tests/decoder/parallel_worker.py OUT --config ... [overrides]
"""
import os
import shutil
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from emu_mc.decoder.config import load_decoder_config  # noqa: E402
from emu_mc.train_decoder import train  # noqa: E402


def run(args, parallel, out_dir):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(load_decoder_config(args[1], args[2:] + ["--decoder.parallel", parallel, "--train.out_dir", out_dir]))
    finally:  # train() installs its checkpoint-on-signal handlers
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def copy_at_step_2(src, dest):
    """`src`'s run as it stood after its step-2 checkpoint: later checkpoints, export and logs dropped."""
    if dist.get_rank() == 0:
        shutil.copytree(os.path.join(src, "checkpoints", "step_000002"),
                        os.path.join(dest, "checkpoints", "step_000002"))
        with open(os.path.join(dest, "checkpoints", "latest"), "w") as f:
            f.write("step_000002")
    dist.barrier()


def uneven_rows_round_trip(out_dir):
    from megatron.core import dist_checkpointing
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from emu_mc.decoder.state import copy_loaded, sharded
    from emu_mc.parallel.groups import init_distributed

    init_distributed(1, 1, 0)
    mesh, rank = init_device_mesh("cpu", (dist.get_world_size(),)), dist.get_rank()
    full = {"five": torch.arange(15.0).view(5, 3), "one": torch.tensor([7.0])}
    if rank == 0:
        os.makedirs(out_dir)
    dist.barrier()
    dist_checkpointing.save(sharded({k: distribute_tensor(t, mesh, [Shard(0)]) for k, t in full.items()}, rank),
                            out_dir)
    whole = {k: torch.zeros_like(t) for k, t in full.items()}
    shards = {k: distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]) for k, t in full.items()}
    for live in (whole, shards):
        copy_loaded(live, dist_checkpointing.load(sharded(live, rank), out_dir))
        for key, t in live.items():
            got = t.full_tensor() if hasattr(t, "full_tensor") else t
            assert torch.equal(got, full[key]), (key, got)


def main():
    out, args = sys.argv[1], sys.argv[2:]
    uneven_rows_round_trip(os.path.join(out, "uneven"))
    for parallel in ("ddp", "fsdp"):
        run(args, parallel, os.path.join(out, parallel))
    for src, dest, parallel in (("fsdp", "fsdp_resumed", "fsdp"), ("fsdp", "fsdp_to_ddp", "ddp"),
                                ("ddp", "ddp_to_fsdp", "fsdp")):
        copy_at_step_2(os.path.join(out, src), os.path.join(out, dest))
        run(args, parallel, os.path.join(out, dest))


if __name__ == "__main__":
    main()
