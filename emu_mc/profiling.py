"""One training step under torch.profiler: where the time goes, written as a table next to the metrics.

`train.profile_step: N` (0 = off) profiles step N on every rank (CPU ops, and CUDA kernels on GPU) and
writes `<out_dir>/profile_step<N>_rank<R>.txt`: the top operators and kernels by self time.
"""
import contextlib
import logging
import os

import torch

log = logging.getLogger("emu_mc.profiling")

TOP_ROWS = 30


@contextlib.contextmanager
def maybe_profile(profile_step: int, step: int, out_dir: str, rank: int):
    """Profile the enclosed block when `step` (1-based) equals `profile_step`; otherwise do nothing."""
    if profile_step <= 0 or step != profile_step:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = torch.cuda.is_available()
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        yield
        if cuda:
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=TOP_ROWS, max_name_column_width=70)
    path = os.path.join(out_dir, f"profile_step{step}_rank{rank}.txt")
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"step {step}, rank {rank}, sorted by {sort_by}\n{table}\n")
    if rank == 0:
        log.info("profile of step %d written to %s", step, path)
