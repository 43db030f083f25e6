"""Pretrain Emu: the story of a run.

    torchrun --nproc_per_node=8 emu_mc/pretrain.py --config configs/emu_14b.yaml [--train.steps 100 ...]
    torchrun --nproc_per_node=2 emu_mc/pretrain.py --config configs/tiny.yaml      # CPU, gloo
    python -m emu_mc.pretrain --config configs/tiny.yaml                            # one process

Config is loaded and validated before any process group exists. Each step: the base learning rate
(warmup + cosine), this rank's microbatches, one megatron-core forward/backward/optimizer step,
then logs (progress bar, console, metrics.jsonl, TensorBoard) and, when due or on SIGTERM, an atomic
sharded checkpoint. A run restarted with the same out_dir resumes from its latest checkpoint.
"""
import argparse
import logging
import os
import signal
import sys
import time
import warnings

if __package__ in (None, ""):  # run as a file under torchrun: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from emu_mc.config import Config, ConfigError, config_to_dict, load_config
from emu_mc.profiling import maybe_profile

log = logging.getLogger("emu_mc.pretrain")


# Exit codes: 0 done (or stopped by a signal, with its checkpoint); 1 the run stopped (damaged or
# unwritable checkpoint, unusable data, divergence); 2 bad config or user input (nothing was changed);
# 130 interrupted by a second Ctrl-C (no checkpoint). Each is reported as one line, by rank 0.
EXIT_STOPPED, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130
NO_IMAGE_STEPS = 10  # steps in a row without an image after which the run warns (reg is not training)


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


def setup_logging(rank: int) -> None:
    """INFO from emu_mc on rank 0, warnings elsewhere; megatron-core's own INFO chatter (bucket
    listings, config dumps) and its known-harmless deprecation warnings are silenced."""
    for message in (".*(Apex|Transformer Engine).*", ".*full scope is deprecated.*", ".*ShardedTensor.*",
                    ".*is deprecated. Please use.*", ".*`load_state_dict` is deprecated.*",
                    ".*grad attribute of a Tensor that is not a leaf.*"):
        warnings.filterwarnings("ignore", message=message)
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)
    logging.getLogger("megatron").setLevel(logging.WARNING)


def parse_args(argv):
    from emu_mc.config_docs import HelpConfigAction

    parser = argparse.ArgumentParser(description="Pretrain an Emu-style model.", epilog=
                                     "Any config field can be overridden: --model.llm.num_layers 4 --train.steps=50 "
                                     "--data.sources.0.shards PATH; --help-config lists them all (docs/config.md)")
    parser.add_argument("--config", required=True, help="YAML job config (see configs/)")
    parser.add_argument("--help-config", action=HelpConfigAction)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML + overrides, validated) and exit")
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def check_local_paths(cfg: Config) -> None:
    """What the run will read exists, checked before any process group: the tokenizer, init_from
    weights (and their architecture) and the data shards. Raises ConfigError / FileNotFoundError /
    ConversionError (a ValueError) naming the field."""
    from emu_mc.data.loader import source_shards
    from emu_mc.tokenizer import tokenizer_dir

    from emu_mc.convert.pretrained import check_init_from

    tokenizer_dir(cfg.model.tokenizer)
    check_init_from(cfg.model)
    if cfg.data.kind == "webdataset":
        source_shards(cfg, open_first=cfg.data.check_remote)


def all_reduce_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def train(cfg: Config) -> dict:
    """Run (or resume) the job described by `cfg`. Returns the last step's metrics."""
    from megatron.core import parallel_state

    from emu_mc import accelerators
    from emu_mc.data import build_data_loader
    from emu_mc.parallel.groups import init_distributed
    from emu_mc.parallel.setup import build_model_and_optimizer
    from emu_mc.tokenizer import load_tokenizer, special_token_ids

    dims = init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.train.seed)
    rank = dist.get_rank()
    setup_logging(rank)
    log.info("world %d = TP %d x PP %d x DP %d on %s", dims.world, dims.tp, dims.pp, dims.dp,
             torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (gloo)")
    log.info("accelerators: %s", "; ".join(f"{name}: {how}" for name, how in accelerators.report().items()))
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    model_chunks, optimizer = build_model_and_optimizer(cfg, special_token_ids(tokenizer), len(tokenizer))
    loader = build_data_loader(cfg, tokenizer, dp_rank=parallel_state.get_data_parallel_rank(),
                               dp_size=parallel_state.get_data_parallel_world_size())
    try:
        return _train_loop(cfg, dims, model_chunks, optimizer, loader, len(tokenizer))
    finally:
        loader.close()


def _train_loop(cfg: Config, dims, model_chunks, optimizer, loader, vocab_size: int) -> dict:
    from emu_mc.checkpoint import (Checkpointer, any_rank, capture_rng_state, check_same_model, load_training_state,
                                   optimizer_checkpoint_format, restore_rng_state, training_state)
    from emu_mc.metrics import RunLogger, device_peak_flops, flops_per_image, flops_per_token
    from emu_mc.parallel.setup import device, train_step, vision_seconds_per_tp_rank
    from emu_mc.schedule import decay_horizon, lr_at, schedule_change

    rank, dev = dist.get_rank(), device()
    checkpointer = Checkpointer(cfg.train.out_dir, cfg.train.keep_checkpoints)
    counters = {"skipped_steps": 0, "nonfinite_in_a_row": 0}
    optimizer_format = optimizer_checkpoint_format(cfg.train.optimizer_checkpoint)
    when = f"every {cfg.train.checkpoint_every} steps, " if cfg.train.checkpoint_every else ""
    when += "at the end and " if cfg.train.save_final else "not at the end (train.save_final false), "
    log.info("checkpoints: %s %son SIGTERM, keeping %d; optimizer state %s", checkpointer.root,
             when, cfg.train.keep_checkpoints, optimizer_format)

    def save(step: int) -> None:
        checkpointer.save(step, training_state(model_chunks, optimizer, optimizer_format),
                          {"rng": capture_rng_state(), "data": loader.state_dict(), "counters": dict(counters)},
                          {"config": config_to_dict(cfg), "tp": dims.tp, "pp": dims.pp, "dp": dims.dp,
                           "optimizer_format": optimizer_format, "vocab_size": vocab_size})

    start_step, latest = 0, checkpointer.latest()
    if latest is not None:
        meta = checkpointer.read_meta(latest)
        check_same_model(latest, meta, config_to_dict(cfg)["model"], vocab_size)
        layout, saved_layout = (dims.tp, dims.pp, dims.dp), (meta["tp"], meta["pp"], meta["dp"])
        _check_reshardable(meta.get("optimizer_format", optimizer_format), saved_layout, layout)
        state, rank_state, meta = checkpointer.load(
            latest, training_state(model_chunks, optimizer, optimizer_format, is_loading=True),
            same_layout=layout == saved_layout)
        load_training_state(model_chunks, optimizer, state)
        if rank_state is not None:
            loader.load_state_dict(rank_state["data"])
            restore_rng_state(rank_state["rng"])
            counters.update(rank_state["counters"])
        else:
            log.warning("layout changed from TP %d x PP %d x DP %d to TP %d x PP %d x DP %d: model and optimizer "
                        "resharded; the data loader starts afresh on the new DP ranks and RNG states are "
                        "reseeded, so this is a continuation, not an exact resume", *saved_layout, *layout)
        start_step = meta["step"]
        log.info("resumed from %s at step %d (written by TP %d x PP %d x DP %d)", latest, start_step, *saved_layout)
        if start_step < cfg.train.steps and (change := schedule_change(meta["config"], cfg, start_step)):
            log.warning(change)
    if start_step >= cfg.train.steps:
        log.info("nothing to do: the latest checkpoint is at step %d and train.steps is %d (raise train.steps to "
                 "continue, or set another train.out_dir to start afresh)", start_step, cfg.train.steps)
        return {}

    flop_token = flops_per_token(cfg.model, cfg.data.seq_length, vocab_size)
    flop_image = flops_per_image(cfg.model)
    peak = device_peak_flops()
    run_log = RunLogger(cfg.train.out_dir, enabled=rank == 0, resume_step=start_step)
    stop = StopRequest()
    progress = None
    if rank == 0:
        from tqdm import tqdm
        progress = tqdm(total=cfg.train.steps, initial=start_step, desc="pretrain", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())

    metrics, steps_without_images = {}, 0
    try:
        for step in range(start_step, cfg.train.steps):
            lr = lr_at(step, cfg.optim, decay_horizon(cfg.optim, cfg.train.steps))
            t0 = time.perf_counter()
            microbatches = _next_microbatches(loader, cfg.parallel.num_microbatches)
            t_data = time.perf_counter() - t0
            with maybe_profile(cfg.train.profile_step, step + 1, cfg.train.out_dir, rank):
                out = train_step(model_chunks, optimizer, microbatches, lr)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            dt = time.perf_counter() - t0

            _count_nonfinite(out, step, counters)
            # every TP x PP rank of a DP replica holds the same batch and loader: count it once
            tokens, images, skipped = all_reduce_sum(
                [n / (dims.tp * dims.pp) for n in (sum(b.num_tokens for b in microbatches),
                                                   sum(b.images.shape[0] for b in microbatches),
                                                   loader.samples_skipped)], dev)
            flops = tokens * flop_token + images * flop_image  # each image once, whichever TP rank encoded it
            vision_s = vision_seconds_per_tp_rank(model_chunks)  # rank 0's TP group: first stage, DP rank 0
            metrics = {
                "loss": out["loss"], "ce": out["ce"], "reg": out["reg"], "grad_norm": out["grad_norm"], "lr": lr,
                "step_time_s": dt, "data_time_s": t_data, "tokens_per_s": tokens / dt, "images_per_s": images / dt,
                "tflops_per_device": flops / dt / dims.world / 1e12,
                "mfu": flops / dt / (peak * dims.world) if peak else None, "skipped_steps": counters["skipped_steps"],
                "data_skipped_samples": round(skipped),
                "vision_time_s": max(vision_s), "vision_time_s_per_rank": vision_s,
            }
            run_log.log(step + 1, metrics)
            if rank == 0 and ((step + 1) % cfg.train.log_every == 0 or step == start_step):
                mfu = f"{metrics['mfu']:.1%}" if metrics["mfu"] is not None else "n/a"
                log.info("step %d/%d | loss %.4f ce %.4f reg %.4f | grad %.3f | lr %.2e | %.2fs (data %.2fs) | "
                         "%.0f tok/s %.1f img/s | mfu %s", step + 1, cfg.train.steps, out["loss"], out["ce"],
                         out["reg"], out["grad_norm"], lr, dt, t_data, metrics["tokens_per_s"],
                         metrics["images_per_s"], mfu)
            limit = cfg.train.max_consecutive_nonfinite
            if counters["nonfinite_in_a_row"] >= limit:
                raise TrainingDiverged(f"{limit} consecutive non-finite steps (train.max_consecutive_nonfinite = "
                                       f"{limit}); stopping. Lower optim.lr or check the data.")
            steps_without_images = 0 if images else steps_without_images + 1
            if steps_without_images == NO_IMAGE_STEPS and rank == 0 and cfg.data.kind == "webdataset":
                _warn_no_images(cfg, loader.stats())
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{out['loss']:.3f}")

            last = step + 1 == cfg.train.steps and cfg.train.save_final
            due = cfg.train.checkpoint_every > 0 and (step + 1) % cfg.train.checkpoint_every == 0
            stopping = any_rank(stop.requested)
            if due or last or stopping:
                save(step + 1)
            if stopping:
                log.info("stopped by signal after step %d; run the same command to resume", step + 1)
                break
    finally:
        if progress is not None:
            progress.close()
        run_log.close()
    if rank == 0:
        log.info("data: %s", loader.stats())
    return metrics


def _next_microbatches(loader, count: int) -> list:
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


def _warn_no_images(cfg: Config, stats: dict) -> None:
    q = cfg.model.resampler.num_queries
    log.warning("NO IMAGES in the last %d steps: the regression loss is not training. Images dropped by the loader: "
                "%s; skipped samples: %s. An image needs data.seq_length (%d) >= %d tokens plus its text (<s>, "
                "[IMG], %d x <image>, [/IMG], </s>); check data.seq_length and the sources", NO_IMAGE_STEPS,
                stats.get("images_dropped", {}), stats.get("skipped", {}), cfg.data.seq_length, q + 4, q)


def _check_reshardable(optimizer_format: str, saved, current) -> None:
    """dp_reshardable optimizer state reloads only into the same TP x PP (any DP)."""
    if optimizer_format == "dp_reshardable" and saved[:2] != current[:2]:
        raise ConfigError(
            f"the latest checkpoint was written by TP {saved[0]} x PP {saved[1]} with dp_reshardable optimizer "
            f"state, which reloads only into the same TP x PP (any DP); this run is TP {current[0]} x PP "
            f"{current[1]}. Resume with that TP x PP, or write checkpoints with "
            "train.optimizer_checkpoint: fully_reshardable (needs apex or transformer-engine)")


def _count_nonfinite(out: dict, step: int, counters: dict) -> None:
    """Count skipped (non-finite) steps, in total and in a row."""
    if not out["skipped"]:
        counters["nonfinite_in_a_row"] = 0
        return
    counters["nonfinite_in_a_row"] += 1
    counters["skipped_steps"] += 1
    log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): update skipped (%d in a row)",
                step + 1, out["loss"], out["grad_norm"], counters["nonfinite_in_a_row"])


def main(argv=None) -> int:
    from emu_mc.parallel.groups import ParallelDims

    rank = int(os.environ.get("RANK", 0))
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:  # the config as resolved, even where its paths exist only elsewhere
            import yaml

            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            return 0
        check_local_paths(cfg)
        ParallelDims(int(os.environ.get("WORLD_SIZE", 1)), cfg.parallel.tensor_parallel,
                     cfg.parallel.pipeline_parallel).check()
    except (ConfigError, FileNotFoundError, ValueError) as err:
        return _report(rank, f"config error: {err}", EXIT_CONFIG)
    setup_logging(rank)
    from emu_mc.config import document_fit_warnings

    for warning in document_fit_warnings(cfg) if rank == 0 else []:
        log.warning("%s", warning)
    return _run(cfg, rank)


def _run(cfg: Config, rank: int) -> int:
    """train(cfg), its expected failures as one line from rank 0 and an exit code (see EXIT_*)."""
    from emu_mc.checkpoint import CheckpointLoadError, CheckpointSaveError
    from emu_mc.convert.errors import ConversionError

    try:
        train(cfg)
    except (ConfigError, ConversionError) as err:  # ConversionError: init_from weights that do not fit
        return _report(rank, f"config error: {err}", EXIT_CONFIG)
    except (TrainingDiverged, CheckpointLoadError, CheckpointSaveError, RunStopped) as err:
        return _report(rank, f"run stopped: {err}", EXIT_STOPPED)
    except KeyboardInterrupt:
        return _report(rank, "interrupted by a second Ctrl-C: no checkpoint written for the steps since the last one",
                       EXIT_INTERRUPTED)
    finally:
        from emu_mc.parallel.groups import destroy_distributed
        destroy_distributed()
    return 0


def _report(rank: int, message: str, code: int) -> int:
    if rank == 0:
        print(message, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
