"""Pipeline parallelism: how the regression targets reach the last stage.

The regression targets of the Emu objective are the *input embeddings* of the next positions: the
resampler's visual embeddings and the `[/IMG]` token embedding. Both exist only on the first
pipeline stage (vision encoder, resampler and word embedding live there), while the loss runs on
the last stage. Recomputing them on the last stage would need the whole vision tower and the
embedding there, so the first stage sends them instead:

- every (first stage, last stage) pair of one pipeline gets its own two-rank process group
  (created collectively by `RegressionTargetChannel.create`), separate from the group megatron's
  schedules use for activations, so the two streams of messages never interleave on one
  communicator (with NCCL, p2p on one communicator must match in order);
- in `EmuModel.forward` the first stage posts a non-blocking send of `reg_targets` [R, H]
  (detached, pipeline dtype) for each microbatch; the last stage, in the forward of the same
  microbatch, computes R from `input_ids` (it has the whole Batch) and receives [R, H];
  microbatches run forward in the same order on every stage, so sends and receives pair up;
- `wait()` (called by train_step after the schedule) completes the first stage's sends.
The last stage derives `reg_index` itself from `input_ids`, so only the targets travel: R x H
values per microbatch (33 x 5120 per image at Emu-14B), small next to the [S, B, H] activations.
"""
import logging
from typing import List, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("emu_mc.parallel")


class RegressionTargetChannel:
    """First pipeline stage -> last pipeline stage, one tensor per microbatch, in order."""

    def __init__(self, group, first_rank: int, last_rank: int):
        self.group, self.first_rank, self.last_rank = group, first_rank, last_rank
        self._pending: List = []  # (work handle, tensor kept alive until the send completes)

    @classmethod
    def create(cls) -> Optional["RegressionTargetChannel"]:
        """Collective over the world. Returns this rank's channel (None when PP == 1 or this rank is
        neither the first nor the last stage of its pipeline)."""
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return None
        pp_ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
        mine = (pp_ranks[0], pp_ranks[-1])
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        channel = None
        for pair in sorted(set(everyone)):  # every rank creates every group, in the same order
            group = dist.new_group(list(pair))
            if dist.get_rank() in pair:
                channel = cls(group, *pair)
        return channel

    def send(self, reg_targets: torch.Tensor) -> None:
        t = reg_targets.detach().contiguous()
        if t.numel() == 0:
            return
        self._pending.append((dist.isend(t, dst=self.last_rank, group=self.group), t))

    def recv(self, num_rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        out = torch.empty(num_rows, hidden, dtype=dtype, device=device)
        if num_rows > 0:
            dist.recv(out, src=self.first_rank, group=self.group)
        return out

    def wait(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
