"""The run machinery that pretraining (emu_mc/pretrain.py) and decoder training
(emu_mc/train_decoder.py) share around their own step: the progress bar, metrics.jsonl + TensorBoard,
the non-finite guard, checkpoints when due, at the end and on SIGTERM / Ctrl-C, and the exit codes with
their one-line messages.

    loop = RunLoop(cfg.train, start_step, rank, "decoder", log)
    with loop:
        for step in loop.steps():
            out = ...  # {'loss', 'grad_norm', 'skipped', ...} of this step
            if loop.finish(step, out, metrics, console_line, save):
                break
"""
import logging
import os
import signal
import sys
from typing import Callable, Dict

import torch
import torch.distributed as dist

log = logging.getLogger("emu_mc.run")

# Exit codes: 0 done (or stopped by a signal, with its checkpoint); 1 the run stopped (damaged or
# unwritable checkpoint, unusable data, divergence); 2 bad config or user input (nothing was changed);
# 130 interrupted by a second Ctrl-C (no checkpoint). Each is reported as one line, by rank 0.
EXIT_STOPPED, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row (train.max_consecutive_nonfinite)."""


class RunStopped(RuntimeError):
    """An error on some rank (e.g. DataError) that every rank stops for; the message is that rank's."""


class StopRequest:
    """Set by SIGTERM or a first SIGINT (Ctrl-C): the loop checkpoints and exits cleanly at the end of
    the current step. A second SIGINT interrupts at once (KeyboardInterrupt), without a checkpoint.

    Python runs a handler once for several deliveries of a signal that arrive while the main thread
    is inside one C call (a long matmul or collective): two Ctrl-C would count as one. So deliveries
    are counted from the wakeup pipe, where the interpreter writes one byte per delivery."""

    def __init__(self):
        self.requested = False
        self.interrupts = 0
        self._deliveries, wakeup = os.pipe()
        for fd in (self._deliveries, wakeup):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wakeup)
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _delivered(self, signum: int) -> int:
        try:
            return max(os.read(self._deliveries, 4096).count(signum), 1)
        except BlockingIOError:
            return 1

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += self._delivered(signum)
            if self.interrupts >= 2:
                raise KeyboardInterrupt
        self.requested = True
        log.warning("%s received: checkpointing after this step, then exiting%s", signal.Signals(signum).name,
                    " (Ctrl-C again to interrupt without a checkpoint)" if signum == signal.SIGINT else "")


def count_nonfinite(out: dict, step: int, counters: dict) -> None:
    """Count skipped (non-finite) steps, in total and in a row."""
    if not out["skipped"]:
        counters["nonfinite_in_a_row"] = 0
        return
    counters["nonfinite_in_a_row"] += 1
    counters["skipped_steps"] += 1
    log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): update skipped (%d in a row)",
                step + 1, out["loss"], out["grad_norm"], counters["nonfinite_in_a_row"])


class RunLoop:
    """Steps start_step .. train.steps - 1 of a run whose TrainConfig is `train`; rank 0 logs, the
    console lines through the stage's `logger`."""

    def __init__(self, train, start_step: int, rank: int, desc: str, logger: logging.Logger):
        from emu_mc.metrics import RunLogger

        self.train, self.start_step, self.rank, self.log = train, start_step, rank, logger
        self.run_log = RunLogger(train.out_dir, enabled=rank == 0, resume_step=start_step)
        self.stop = StopRequest()
        self.progress = None
        if rank == 0:
            from tqdm import tqdm
            self.progress = tqdm(total=train.steps, initial=start_step, desc=desc, dynamic_ncols=True,
                                 disable=not sys.stderr.isatty())

    def steps(self) -> range:
        return range(self.start_step, self.train.steps)

    def finish(self, step: int, out: dict, counters: dict, metrics: Dict, console_line: Callable[[], str],
               save: Callable[[int], None]) -> bool:
        """After step `step` (0-based) whose result is `out` ({'loss', 'grad_norm', 'skipped'}): log
        `metrics`, the console line when due, stop on too many non-finite steps in a row
        (TrainingDiverged), checkpoint when due / at the end / on a stop signal. Collective (the stop
        request is agreed over ranks). Returns True when the run stops here on a signal."""
        from emu_mc.checkpoint import any_rank

        self.run_log.log(step + 1, metrics)
        if self.rank == 0 and ((step + 1) % self.train.log_every == 0 or step == self.start_step):
            self.log.info("%s", console_line())
        limit = self.train.max_consecutive_nonfinite
        if counters["nonfinite_in_a_row"] >= limit:
            raise TrainingDiverged(f"{limit} consecutive non-finite steps (train.max_consecutive_nonfinite = "
                                   f"{limit}); stopping. Lower optim.lr or check the data.")
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{out['loss']:.3f}")
        last = step + 1 == self.train.steps and self.train.save_final
        due = self.train.checkpoint_every > 0 and (step + 1) % self.train.checkpoint_every == 0
        stopping = any_rank(self.stop.requested)
        if due or last or stopping:
            save(step + 1)
        if stopping:
            log.info("stopped by signal after step %d; run the same command to resume", step + 1)
        return stopping

    def __enter__(self) -> "RunLoop":
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.close()
        self.run_log.close()


def next_batches(loader, count: int) -> list:
    """`count` batches from the loader. Collective: when the loader fails on any rank (DataError),
    every rank raises RunStopped with that rank's message, so none is left waiting in a collective."""
    from emu_mc.checkpoint import first_error
    from emu_mc.data import DataError

    try:
        batches, error = [next(loader) for _ in range(count)], None
    except DataError as err:
        batches, error = [], f"data: {err}"
    error = first_error(error)
    if error is not None:
        raise RunStopped(error)
    return batches


def all_reduce_sum(values, device) -> list:
    """Collective: the element-wise sum over ranks of a list of numbers (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def run_with_exit_code(train: Callable[[], object], rank: int) -> int:
    """train(), its expected failures as one line from rank 0 and an exit code (see EXIT_*); the
    process groups it set up are destroyed in any case (a world that existed before, e.g. a caller's
    in the same process, is left as it was)."""
    from emu_mc.checkpoint import CheckpointLoadError, CheckpointSaveError
    from emu_mc.config import ConfigError
    from emu_mc.convert.errors import ConversionError
    from emu_mc.parallel.groups import process_groups_torn_down

    with process_groups_torn_down():
        try:
            train()
        except (ConfigError, ConversionError) as err:  # ConversionError: init_from weights that do not fit
            return report(rank, f"config error: {err}", EXIT_CONFIG)
        except (TrainingDiverged, CheckpointLoadError, CheckpointSaveError, RunStopped) as err:
            return report(rank, f"run stopped: {err}", EXIT_STOPPED)
        except KeyboardInterrupt:
            return report(rank, "interrupted by a second Ctrl-C: no checkpoint written for the steps since the last "
                          "one", EXIT_INTERRUPTED)
    return 0


def report(rank: int, message: str, code: int) -> int:
    if rank == 0:
        print(message, file=sys.stderr, flush=True)
    return code
