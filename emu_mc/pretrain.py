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

log = logging.getLogger("emu_mc.pretrain")


class StopRequest:
    """Set by SIGTERM/SIGINT: the loop checkpoints and exits cleanly at the end of the current step."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("signal %d received: checkpointing after this step, then exiting", signum)


def setup_logging(rank: int) -> None:
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Pretrain an Emu-style model.", epilog=
                                     "Any config field can be overridden: --model.llm.num_layers 4 --train.steps=50")
    parser.add_argument("--config", required=True, help="YAML job config (see configs/)")
    args, overrides = parser.parse_known_args(argv)
    return args.config, overrides


def all_reduce_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def train(cfg: Config) -> dict:
    """Run (or resume) the job described by `cfg`. Returns the last step's metrics."""
    from megatron.core import parallel_state

    from emu_mc.checkpoint import Checkpointer, capture_rng_state, restore_rng_state
    from emu_mc.data import build_data_loader
    from emu_mc.metrics import RunLogger, device_peak_flops, flops_per_image, flops_per_token
    from emu_mc.parallel.groups import init_distributed
    from emu_mc.parallel.setup import build_model_and_optimizer, train_step
    from emu_mc.schedule import lr_at
    from emu_mc.tokenizer import load_tokenizer, special_token_ids

    dims = init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.train.seed)
    rank = dist.get_rank()
    setup_logging(rank)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    log.info("world %d = TP %d x PP %d x DP %d on %s", dims.world, dims.tp, dims.pp, dims.dp,
             torch.cuda.get_device_name() if device.type == "cuda" else "CPU (gloo)")

    tokenizer = load_tokenizer(cfg.model.tokenizer)
    ids = special_token_ids(tokenizer)
    model_chunks, optimizer = build_model_and_optimizer(cfg, ids, len(tokenizer))
    loader = build_data_loader(cfg, tokenizer, dp_rank=parallel_state.get_data_parallel_rank(),
                               dp_size=parallel_state.get_data_parallel_world_size())

    checkpointer = Checkpointer(cfg.train.out_dir, cfg.train.keep_checkpoints)

    def sharded_state():
        model_state = model_chunks[0].sharded_state_dict() if len(model_chunks) == 1 else {
            f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}
        return {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state)}

    def save(step: int) -> None:
        checkpointer.save(step, sharded_state(), {"rng": capture_rng_state(), "data": loader.state_dict()},
                          {"config": config_to_dict(cfg), "tp": dims.tp, "pp": dims.pp, "dp": dims.dp})

    start_step = 0
    latest = checkpointer.latest()
    if latest is not None:
        state, rank_state, meta = checkpointer.load(latest, sharded_state())
        if len(model_chunks) == 1:
            model_chunks[0].load_state_dict(state["model"])
        else:
            for i, chunk in enumerate(model_chunks):
                chunk.load_state_dict(state["model"][f"model{i}"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(rank_state["data"])
        restore_rng_state(rank_state["rng"])
        start_step = meta["step"]
        log.info("resumed from %s at step %d", latest, start_step)

    flop_token = flops_per_token(cfg.model, cfg.data.seq_length, len(tokenizer))
    flop_image = flops_per_image(cfg.model)
    peak = device_peak_flops()
    run_log = RunLogger(cfg.train.out_dir, enabled=rank == 0)
    stop = StopRequest()
    progress = None
    if rank == 0:
        from tqdm import tqdm
        progress = tqdm(total=cfg.train.steps, initial=start_step, desc="pretrain", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())

    nonfinite_in_a_row, skipped_total, metrics = 0, 0, {}
    for step in range(start_step, cfg.train.steps):
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        t0 = time.perf_counter()
        microbatches = [next(loader) for _ in range(cfg.parallel.num_microbatches)]
        t_data = time.perf_counter() - t0
        out = train_step(model_chunks, optimizer, microbatches, lr)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0

        tokens, images = all_reduce_sum([sum(b.num_tokens for b in microbatches) / (dims.tp * dims.pp),
                                         sum(b.images.shape[0] for b in microbatches) / (dims.tp * dims.pp)], device)
        flops = tokens * flop_token + images * flop_image
        if out["skipped"]:
            nonfinite_in_a_row += 1
            skipped_total += 1
            log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): update skipped (%d in a row)",
                        step + 1, out["loss"], out["grad_norm"], nonfinite_in_a_row)
            if nonfinite_in_a_row >= cfg.train.max_consecutive_nonfinite:
                raise RuntimeError(f"{nonfinite_in_a_row} consecutive non-finite steps (train.max_consecutive_nonfinite = "
                                   f"{cfg.train.max_consecutive_nonfinite}); stopping. Lower optim.lr or check the data.")
        else:
            nonfinite_in_a_row = 0
        metrics = {
            "loss": out["loss"], "ce": out["ce"], "reg": out["reg"], "grad_norm": out["grad_norm"], "lr": lr,
            "step_time_s": dt, "data_time_s": t_data, "tokens_per_s": tokens / dt, "images_per_s": images / dt,
            "tflops_per_device": flops / dt / dims.world / 1e12,
            "mfu": flops / dt / (peak * dims.world) if peak else None, "skipped_steps": skipped_total,
        }
        run_log.log(step + 1, metrics)
        if rank == 0 and ((step + 1) % cfg.train.log_every == 0 or step == start_step):
            mfu = f"{metrics['mfu']:.1%}" if metrics["mfu"] is not None else "n/a"
            log.info("step %d/%d | loss %.4f ce %.4f reg %.4f | grad %.3f | lr %.2e | %.2fs | %.0f tok/s %.1f img/s | mfu %s",
                     step + 1, cfg.train.steps, out["loss"], out["ce"], out["reg"], out["grad_norm"], lr, dt,
                     metrics["tokens_per_s"], metrics["images_per_s"], mfu)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{out['loss']:.3f}")

        last = step + 1 == cfg.train.steps
        due = cfg.train.checkpoint_every > 0 and (step + 1) % cfg.train.checkpoint_every == 0
        stopping = _any_rank(stop.requested, device)
        if due or last or stopping:
            save(step + 1)
        if stopping:
            log.info("stopped by signal after step %d; resume by running the same command", step + 1)
            break

    if progress is not None:
        progress.close()
    if rank == 0:
        log.info("data: %s", loader.stats())
    run_log.close()
    return metrics


def _any_rank(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def main(argv=None) -> int:
    config_path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(config_path, overrides)
        from emu_mc.parallel.groups import ParallelDims
        ParallelDims(int(os.environ.get("WORLD_SIZE", 1)), cfg.parallel.tensor_parallel,
                     cfg.parallel.pipeline_parallel).check()
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    setup_logging(int(os.environ.get("RANK", 0)))
    try:
        train(cfg)
    finally:
        from emu_mc.parallel.groups import destroy_distributed
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
