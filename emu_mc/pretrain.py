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
import sys
import time
import warnings

if __package__ in (None, ""):  # run as a file under torchrun: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from emu_mc.config import Config, ConfigError, config_to_dict, load_config
from emu_mc.data.remote import without_credentials
from emu_mc.profiling import maybe_profile
from emu_mc.model.document_attention import resolve_attention_impl
from emu_mc.run_loop import (EXIT_CONFIG, RunLoop, all_reduce_sum, count_nonfinite, next_batches, report,
                             run_with_exit_code)

log = logging.getLogger("emu_mc.pretrain")


FINETUNE_DESCRIPTION = ("Instruction-tune an Emu-style model: LoRA adapters on the LLM's attention (finetune.mode "
                        "lora) or every weight (full), from model.init_from.")
NO_IMAGE_STEPS = 10  # steps in a row without an image after which the run warns (reg is not training)


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


def parse_args(argv, description: str = "Pretrain an Emu-style model."):
    from emu_mc.config_docs import HelpConfigAction

    parser = argparse.ArgumentParser(description=description, epilog=
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
    log.info("accelerators: %s", "; ".join(f"{name}: {how}" for name, how in
                                            accelerators.report(cfg.model.llm.attention_impl).items()))
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.chat_tokens)
    if cfg.finetune is not None:
        f = cfg.finetune
        log.info("fine-tuning from %s: %s", cfg.model.init_from or cfg.model.llm.init_from,
                 f"LoRA rank {f.lora_rank}, alpha {f.lora_alpha:g}, dropout {f.lora_dropout:g} on the LLM's attention "
                 "q, k, v, o; everything else frozen" if f.mode == "lora" else "every weight (full)")
    model_chunks, optimizer = build_model_and_optimizer(cfg, special_token_ids(tokenizer), len(tokenizer))
    loader = build_data_loader(cfg, tokenizer, dp_rank=parallel_state.get_data_parallel_rank(),
                               dp_size=parallel_state.get_data_parallel_world_size())
    try:
        return _train_loop(cfg, dims, model_chunks, optimizer, loader, len(tokenizer))
    finally:
        loader.close()


def _train_loop(cfg: Config, dims, model_chunks, optimizer, loader, vocab_size: int) -> dict:
    from emu_mc.checkpoint import (Checkpointer, capture_rng_state, check_same_model, load_training_state,
                                   optimizer_checkpoint_format, restore_rng_state, training_state)
    from emu_mc.metrics import (device_peak_flops, flops_per_attention_pair, flops_per_image, flops_per_token,
                                run_summary)
    from emu_mc.convert.pretrained import base_identity, check_base_identity
    from emu_mc.model.document_attention import causal_pairs
    from emu_mc.model.lora import LoRASettings
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

    # LoRA checkpoints hold adapters only: they record which base they belong to (model.init_from's identity)
    base = {"base": base_identity(cfg.model)} if LoRASettings.of(cfg.finetune) else {}

    def save(step: int) -> None:
        checkpointer.save(step, training_state(model_chunks, optimizer, optimizer_format),
                          {"rng": capture_rng_state(), "data": loader.state_dict(), "counters": dict(counters)},
                          {"config": without_credentials(config_to_dict(cfg)), "tp": dims.tp, "pp": dims.pp,
                           "dp": dims.dp, "optimizer_format": optimizer_format, "vocab_size": vocab_size, **base})

    start_step, latest = 0, checkpointer.latest()
    if latest is not None:
        meta = checkpointer.read_meta(latest)
        check_same_model(latest, meta, config_to_dict(cfg), vocab_size)
        if base and "base" in meta:
            check_base_identity(meta["base"], cfg.model, latest)
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

    flop_token = flops_per_token(cfg.model, vocab_size)
    flop_pair = flops_per_attention_pair(cfg.model)
    flop_image = flops_per_image(cfg.model)
    peak = device_peak_flops()
    metrics, steps_without_images = {}, 0
    totals, t_start, step = {"tokens": 0.0, "images": 0.0}, time.perf_counter(), start_step - 1
    with RunLoop(cfg.train, start_step, rank, "pretrain" if cfg.finetune is None else "finetune", log) as loop:
        for step in loop.steps():
            lr = lr_at(step, cfg.optim, decay_horizon(cfg.optim, cfg.train.steps))
            t0 = time.perf_counter()
            microbatches = next_batches(loader, cfg.parallel.num_microbatches)
            t_data = time.perf_counter() - t0
            with maybe_profile(cfg.train.profile_step, step + 1, cfg.train.out_dir, rank):
                out = train_step(model_chunks, optimizer, microbatches, lr)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            dt = time.perf_counter() - t0

            count_nonfinite(out, step, counters)
            # every TP x PP rank of a DP replica holds the same batch and loader: count it once
            tokens, pairs, images, skipped = all_reduce_sum(
                [n / (dims.tp * dims.pp) for n in (sum(b.num_tokens for b in microbatches),
                                                   sum(causal_pairs(b.segment_ids) for b in microbatches),
                                                   sum(b.images.shape[0] for b in microbatches),
                                                   loader.samples_skipped)], dev)
            totals["tokens"] += tokens
            totals["images"] += images
            # each image counted once, whichever TP rank encoded it
            flops = tokens * flop_token + pairs * flop_pair + images * flop_image
            vision_s = vision_seconds_per_tp_rank(model_chunks)  # rank 0's TP group: first stage, DP rank 0
            metrics = {
                "loss": out["loss"], "ce": out["ce"], "reg": out["reg"], "grad_norm": out["grad_norm"], "lr": lr,
                "step_time_s": dt, "data_time_s": t_data, "tokens_per_s": tokens / dt, "images_per_s": images / dt,
                "tflops_per_device": flops / dt / dims.world / 1e12,
                "mfu": flops / dt / (peak * dims.world) if peak else None, "skipped_steps": counters["skipped_steps"],
                "data_skipped_samples": round(skipped),
                "vision_time_s": max(vision_s), "vision_time_s_per_rank": vision_s,
            }

            def console_line() -> str:
                mfu = f"{metrics['mfu']:.1%}" if metrics["mfu"] is not None else "n/a"
                return (f"step {step + 1}/{cfg.train.steps} | loss {out['loss']:.4f} ce {out['ce']:.4f} reg "
                        f"{out['reg']:.4f} | grad {out['grad_norm']:.3f} | lr {lr:.2e} | {dt:.2f}s "
                        f"(data {t_data:.2f}s) "
                        f"| {metrics['tokens_per_s']:.0f} tok/s {metrics['images_per_s']:.1f} img/s | mfu {mfu}")

            steps_without_images = 0 if images else steps_without_images + 1
            if steps_without_images == NO_IMAGE_STEPS and rank == 0 and cfg.data.kind == "webdataset":
                _warn_no_images(cfg, loader.stats())
            if loop.finish(step, out, counters, metrics, console_line, save):
                break
    if rank == 0:
        log.info("%s", run_summary(first_step=start_step, last_step=step + 1, tokens=totals["tokens"],
                                   images=totals["images"], wall_s=time.perf_counter() - t_start, metrics=metrics,
                                   data_stats=loader.stats(), checkpoint=checkpointer.latest(),
                                   out_dir=cfg.train.out_dir, tensorboard=loop.run_log.tb is not None))
        log.debug("data: %s", loader.stats())
    return metrics


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


def main(argv=None, finetune: bool = False) -> int:
    """The command: pretraining, or with `finetune` instruction tuning (emu_mc/finetune.py: the same
    run with the config's finetune section, which gets its defaults when absent)."""
    from emu_mc.convert.pretrained import pin_init_from
    from emu_mc.parallel.groups import ParallelDims

    rank = int(os.environ.get("RANK", 0))
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv,
                                 FINETUNE_DESCRIPTION if finetune else "Pretrain an Emu-style model.")
    try:
        cfg = load_config(args.config, overrides, finetune=finetune)
        if cfg.finetune is not None and not finetune:
            raise ConfigError("finetune: this config instruction-tunes a model; run emu_mc/finetune.py with it "
                              "(or remove the finetune section to pretrain)")
        if args.print_config:  # the config as resolved, even where its paths exist only elsewhere
            import yaml

            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            return 0
        if finetune:
            pin_init_from(cfg.model, cfg.train.out_dir)
        check_local_paths(cfg)
        resolve_attention_impl(cfg.model.llm.attention_impl, training=True)  # a backend this machine lacks: exit 2 now
        ParallelDims(int(os.environ.get("WORLD_SIZE", 1)), cfg.parallel.tensor_parallel,
                     cfg.parallel.pipeline_parallel).check()
    except (ConfigError, FileNotFoundError, ValueError) as err:
        return report(rank, f"config error: {err}", EXIT_CONFIG)
    setup_logging(rank)
    from emu_mc.config import document_fit_warnings

    for warning in document_fit_warnings(cfg) if rank == 0 else []:
        log.warning("%s", warning)
    return run_with_exit_code(lambda: train(cfg), rank)


if __name__ == "__main__":
    sys.exit(main())
