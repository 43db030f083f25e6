"""Stage 2: train the visual decoder, a diffusion UNet that reads Emu's regressed embeddings
(docs/model.md "Visual decoder training").

    torchrun --nproc_per_node=8 emu_mc/train_decoder.py --config configs/decoder_sd15.yaml
    torchrun --nproc_per_node=2 emu_mc/train_decoder.py --config configs/decoder_tiny.yaml   # CPU, gloo
    python -m emu_mc.train_decoder --config configs/decoder_tiny.yaml [--train.steps 2 ...]

Each step, on every data-parallel rank: a batch of image-text pairs; the frozen Emu computes each
pair's condition by teacher forcing (emu_mc/decoder/condition.py); a share decoder.cond_drop_prob of
them becomes generation's unconditional condition; the frozen VAE encodes the images; the UNet's
noise-prediction loss (emu_mc/decoder/objective.py) is averaged over ranks (DDP, or FSDP with
decoder.parallel: fsdp; emu_mc/decoder/parallel.py), clipped, and AdamW steps with pretraining's warmup +
cosine. The run machinery is pretraining's (emu_mc/pretrain.py):
exit codes and one-line errors, SIGTERM / Ctrl-C checkpoint, atomic checkpoints with exact resume,
progress bar, metrics.jsonl + TensorBoard, non-finite guard. At the end the UNet (its EMA when
decoder.ema_decay > 0) is exported with the VAE and scheduler to <train.out_dir>/decoder, a directory
generation loads with --decoder.
"""
import argparse
import json
import logging
import os
import shutil
import sys
import time
from typing import Optional

if __package__ in (None, ""):  # run as a file under torchrun: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from emu_mc.config import ConfigError
from emu_mc.config_docs import HelpConfigAction
from emu_mc.data.remote import redact, without_credentials
from emu_mc.decoder.config import DecoderJobConfig, decoder_config_to_dict, load_decoder_config
from emu_mc.decoder.parallel import clip_grad_norm, full_tensor, wrap_unet
from emu_mc.pretrain import setup_logging
from emu_mc.profiling import maybe_profile
from emu_mc.run_loop import (EXIT_CONFIG, RunLoop, all_reduce_sum, count_nonfinite, next_batches, report,
                             run_with_exit_code)

log = logging.getLogger("emu_mc.train_decoder")


def check_local_paths(cfg: DecoderJobConfig) -> int:
    """What the run reads exists and fits (before any process group): the Emu checkpoint or the
    precomputed directory, the decoder directory (its UNet reads the LLM width), the shards. Returns the
    LLM width. Raises ConfigError naming the field."""
    from emu_mc.data.shards import expand_shards
    from emu_mc.decoder.precompute import META_FILE, shard_pattern
    from emu_mc.inference.loading import resolve_checkpoint
    from emu_mc.inference.settings import GenerationInputError

    for sub in ("unet", "vae", "scheduler"):
        if not os.path.isdir(os.path.join(cfg.decoder.init, sub)):
            raise ConfigError(f"decoder.init: {cfg.decoder.init} has no {sub}/ directory; give a decoder directory "
                              "(python -m emu_mc.convert sd-to-decoder, or emu_mc.inference.tiny_decoder)")
    if cfg.data.precomputed:
        source, meta_path = "data.precomputed", os.path.join(cfg.data.precomputed, META_FILE)
        if not os.path.isfile(meta_path) or not expand_shards(shard_pattern(cfg.data.precomputed)):
            raise ConfigError(f"data.precomputed: {cfg.data.precomputed} holds no precomputed shards and {META_FILE} "
                              "(write them with python -m emu_mc.decoder.precompute)")
    else:
        source = "emu.checkpoint"
        try:
            meta_path = os.path.join(resolve_checkpoint(cfg.emu.checkpoint), "meta.json")
        except GenerationInputError as err:
            raise ConfigError(f"emu.checkpoint: {str(err).split(': ', 1)[-1]}") from None
        for i, src in enumerate(cfg.data.sources):
            if not [p for p in expand_shards(src.shards) if os.path.isfile(p)]:
                raise ConfigError(f"data.sources[{i}].shards: no file matches {src.shards!r}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        llm_width = meta["llm_width"] if cfg.data.precomputed else meta["config"]["model"]["llm"]["hidden_size"]
        with open(os.path.join(cfg.decoder.init, "unet", "config.json")) as f:
            unet_width = json.load(f)["cross_attention_dim"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{source} / decoder.init: cannot read the model widths ({err})") from None
    if unet_width != llm_width:
        raise ConfigError(f"decoder.init: its UNet's cross_attention_dim is {unet_width}, but the LLM width of "
                          f"{source} is {llm_width}; convert with python -m emu_mc.convert sd-to-decoder "
                          f"--llm-width {llm_width}")
    return llm_width


class DecoderRun:
    """The frozen Emu and VAE (online conditions) or the precomputed unconditional condition, the UNet
    being trained (DDP or FSDP over every rank: decoder.parallel), its optimizer and EMA."""

    def __init__(self, cfg: DecoderJobConfig, device: torch.device, llm_width: int):
        from diffusers import DDPMScheduler

        from emu_mc.decoder.condition import unconditional_condition
        from emu_mc.decoder.precompute import UNCOND_FILE
        from emu_mc.inference.decoder import VisualDecoder
        from emu_mc.inference.loading import load_emu

        self.cfg, self.device = cfg, device
        self.autocast = torch.bfloat16 if cfg.train.precision == "bf16" and device.type == "cuda" else None
        self.emu = None
        if not cfg.data.precomputed:
            self.emu = load_emu(cfg.emu.checkpoint, tokenizer=cfg.emu.tokenizer or None, device=device,
                                tensor_parallel=1, dtype=self.autocast)
            self.emu.model.requires_grad_(False)
            self.uncond = unconditional_condition(self.emu).float()
        else:
            import numpy as np

            self.uncond = torch.from_numpy(np.load(os.path.join(cfg.data.precomputed, UNCOND_FILE))).to(device)
        decoder = VisualDecoder.load(cfg.decoder.init, llm_width=llm_width, device=device)
        self.vae = decoder.vae.requires_grad_(False).eval()
        self.vae_scaling = getattr(self.vae.config, "scaling_factor", 0.18215)
        self.unet = decoder.unet.float().train()
        scheduler_config = DDPMScheduler.load_config(cfg.decoder.init, subfolder="scheduler", local_files_only=True)
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config, prediction_type=cfg.decoder.prediction_type)
        self.parallel_unet = wrap_unet(self.unet, cfg.decoder.parallel, device)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.ema = ({n: p.detach().float().clone() for n, p in self.unet.named_parameters()}
                    if cfg.decoder.ema_decay > 0 else None)
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + dist.get_rank())

    def loss(self, batch, generator: torch.Generator):
        """A PairBatch (online: Emu and the VAE run here) or a PrecomputedBatch -> (fp32 loss, dropped [B]
        bool). Draws, in order, from `generator`: condition drops, the latent sample, noise and timesteps."""
        from emu_mc.decoder.condition import drop_conditions, teacher_forced_conditions
        from emu_mc.decoder.data import PrecomputedBatch
        from emu_mc.decoder.objective import diffusion_loss, sample_latents, vae_posterior

        precomputed = isinstance(batch, PrecomputedBatch)
        cond = batch.cond.to(self.device) if precomputed else \
            teacher_forced_conditions(self.emu.model, batch.emu.to(self.device)).float()
        cond, dropped = drop_conditions(cond, self.uncond, self.cfg.decoder.cond_drop_prob, generator)
        mean, std = (batch.mean, batch.std) if precomputed else vae_posterior(self.vae, batch.pixels.to(self.device))
        latents = sample_latents(mean.to(self.device), std.to(self.device), self.vae_scaling, generator)
        loss = diffusion_loss(self.parallel_unet, self.noise_scheduler, latents, cond, generator, self.autocast)
        return loss, dropped

    def step(self, batch, lr: float) -> dict:
        """One optimizer step on this rank's batch -> {'loss' (mean over ranks), 'grad_norm', 'dropped',
        'skipped'}; a non-finite loss or gradient skips the update on every rank."""
        from emu_mc.decoder.state import update_ema

        loss, dropped = self.loss(batch, self.generator)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_grad_norm(self.unet.parameters(), self.cfg.optim.grad_clip or float("inf"))
        mean_loss = all_reduce_sum([float(loss.detach())], self.device)[0] / dist.get_world_size()
        skipped = not (torch.isfinite(torch.tensor([mean_loss, grad_norm])).all())
        if not skipped:
            self.optimizer.step()
            if self.ema is not None:
                update_ema(self.ema, self.unet, self.cfg.decoder.ema_decay)
        return {"loss": mean_loss, "grad_norm": grad_norm, "dropped": int(dropped.sum()), "skipped": skipped}

    def tensors(self):
        from emu_mc.decoder.state import decoder_tensors

        return decoder_tensors(self.unet, self.optimizer, self.ema)

    def export(self, out_dir: str) -> Optional[str]:
        """Collective (FSDP gathers the weights). Rank 0 writes the UNet (its EMA when kept), the VAE and
        decoder.init's scheduler (prediction_type set to the trained one) as a diffusers directory, under a
        temporary name then renamed, and returns its path; the other ranks return None."""
        from diffusers import UNet2DConditionModel

        rank, weights = dist.get_rank(), {}
        for name, t in {**self.unet.state_dict(), **(self.ema or {})}.items():  # the EMA replaces the weights
            whole = full_tensor(t.detach())  # under FSDP a gather on every rank, one tensor at a time
            if rank == 0:
                weights[name] = whole.cpu()
        if rank != 0:
            return None
        final, tmp = os.path.join(out_dir, "decoder"), os.path.join(out_dir, "decoder.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(self.unet.config)
        unet.load_state_dict(weights, assign=True)
        unet.save_pretrained(os.path.join(tmp, "unet"))
        for sub in ("vae", "scheduler"):
            shutil.copytree(os.path.join(self.cfg.decoder.init, sub), os.path.join(tmp, sub))
        config_path = os.path.join(tmp, "scheduler", "scheduler_config.json")
        with open(config_path) as f:
            scheduler_config = json.load(f)
        with open(config_path, "w") as f:  # the sampler must predict what the UNet was trained to predict
            json.dump({**scheduler_config, "prediction_type": self.cfg.decoder.prediction_type}, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final


def train(cfg: DecoderJobConfig) -> dict:
    """Run (or resume) the decoder-training job `cfg`. Returns the last step's metrics."""
    from emu_mc.decoder.data import pair_loader, precomputed_loader
    from emu_mc.parallel.groups import init_distributed
    from emu_mc.parallel.setup import device

    llm_width = check_local_paths(cfg)
    init_distributed(1, 1, cfg.train.seed)
    rank, world = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    torch.manual_seed(cfg.train.seed)
    run = DecoderRun(cfg, device(), llm_width)
    conditions = f"precomputed ({cfg.data.precomputed})" if cfg.data.precomputed else \
        f"online from the frozen Emu {run.emu.checkpoint} and VAE"
    log.info("decoder training: %s over %d rank(s) on %s; UNet %.1fM params (%s), conditions %s, cond_drop_prob "
             "%.2f", cfg.decoder.parallel.upper(), world,
             torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (gloo)",
             sum(p.numel() for p in run.unet.parameters()) / 1e6, cfg.decoder.prediction_type, conditions,
             cfg.decoder.cond_drop_prob)
    if cfg.data.precomputed:
        loader = precomputed_loader(cfg, seed=cfg.train.seed, dp_rank=rank, dp_size=world)
    else:
        loader = pair_loader(cfg, run.emu, seed=cfg.train.seed, dp_rank=rank, dp_size=world)
    return _train_loop(cfg, run, loader)


def check_same_data(path: str, saved: dict, cfg: DecoderJobConfig) -> None:
    """Refuse (ConfigError) to resume checkpoint `path` on other data: its data.precomputed directory, or
    online, its data.sources, differ from this run's (`saved`: the checkpoint's config["data"])."""
    def stream(data: dict) -> str:
        if data.get("precomputed"):
            return f"precomputed conditions in {data['precomputed']}"
        return f"online conditions from the shards {[(redact(s['shards']), s['weight']) for s in data['sources']]}"

    current = decoder_config_to_dict(cfg)["data"]
    then, now = stream(saved), stream(current)
    if then != now:
        field = "data.precomputed" if saved.get("precomputed") or current["precomputed"] else "data.sources"
        raise ConfigError(f"{field}: {path} was trained on {then}, this run reads {now}. Resume with the "
                          "checkpoint's data, or set another train.out_dir to start afresh")


def _train_loop(cfg: DecoderJobConfig, run: DecoderRun, loader) -> dict:
    from emu_mc.checkpoint import Checkpointer, capture_rng_state, restore_rng_state
    from emu_mc.decoder.state import copy_loaded, sharded
    from emu_mc.schedule import decay_horizon, lr_at

    rank, world = dist.get_rank(), dist.get_world_size()
    checkpointer = Checkpointer(cfg.train.out_dir, cfg.train.keep_checkpoints)
    counters = {"skipped_steps": 0, "nonfinite_in_a_row": 0, "pairs": 0, "dropped": 0}

    def save(step: int) -> None:
        checkpointer.save(step, sharded(run.tensors(), rank),
                          {"rng": capture_rng_state(), "generator": run.generator.get_state(),
                           "data": loader.state_dict(), "counters": dict(counters)},
                          {"config": without_credentials(decoder_config_to_dict(cfg)), "stage": "decoder",
                           "tp": 1, "pp": 1, "dp": world})

    start_step, latest = 0, checkpointer.latest()
    if latest is not None:
        meta = checkpointer.read_meta(latest)
        if meta.get("stage") != "decoder":
            raise ConfigError(f"train.out_dir: {latest} is not a decoder-training checkpoint; set another "
                              "train.out_dir")
        check_same_data(latest, meta["config"]["data"], cfg)
        tensors = run.tensors()
        state, rank_state, meta = checkpointer.load(latest, sharded(tensors, rank), same_layout=meta["dp"] == world)
        copy_loaded(tensors, state)
        if rank_state is not None:
            loader.load_state_dict(rank_state["data"])
            restore_rng_state(rank_state["rng"])
            run.generator.set_state(rank_state["generator"])
            counters.update(rank_state["counters"])
        else:
            log.warning("data-parallel size changed from %d to %d: weights and optimizer restored; data order and "
                        "RNG start afresh, so this is a continuation, not an exact resume", meta["dp"], world)
        start_step, written_under = meta["step"], meta["config"]["decoder"].get("parallel", "ddp")
        log.info("resumed from %s at step %d (written under %s, now %s)", latest, start_step, written_under.upper(),
                 cfg.decoder.parallel.upper())
    if start_step >= cfg.train.steps:
        log.info("nothing to do: the latest checkpoint is at step %d and train.steps is %d", start_step,
                 cfg.train.steps)
        return {}

    metrics = {}
    with RunLoop(cfg.train, start_step, rank, "decoder", log) as loop:
        for step in loop.steps():
            lr = lr_at(step, cfg.optim, decay_horizon(cfg.optim, cfg.train.steps))
            t0 = time.perf_counter()
            (pairs,) = next_batches(loader, 1)
            t_data = time.perf_counter() - t0
            with maybe_profile(cfg.train.profile_step, step + 1, cfg.train.out_dir, rank):
                out = run.step(pairs, lr)
                if run.device.type == "cuda":
                    torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            count_nonfinite(out, step, counters)
            images, dropped, skipped = all_reduce_sum([pairs.size, out["dropped"], loader.samples_skipped],
                                                      run.device)
            counters["pairs"] += int(images)
            counters["dropped"] += int(dropped)
            metrics = {"loss": out["loss"], "grad_norm": out["grad_norm"], "lr": lr, "step_time_s": dt,
                       "data_time_s": t_data, "images_per_s": images / dt,
                       "cond_drop_rate": counters["dropped"] / max(counters["pairs"], 1),
                       "skipped_steps": counters["skipped_steps"], "data_skipped_samples": round(skipped)}

            def console_line() -> str:
                return (f"step {step + 1}/{cfg.train.steps} | loss {out['loss']:.4f} | grad {out['grad_norm']:.3f} | "
                        f"lr {lr:.2e} | {dt:.2f}s (data {t_data:.2f}s) | {metrics['images_per_s']:.1f} img/s | "
                        f"cond dropped {100 * metrics['cond_drop_rate']:.1f}%")

            if loop.finish(step, out, counters, metrics, console_line, save):
                return metrics
    exported = run.export(cfg.train.out_dir)
    if exported:
        log.info("exported the decoder to %s (generation: --decoder DIR)", exported)
    dist.barrier()
    return metrics


def main(argv=None) -> int:
    rank = int(os.environ.get("RANK", 0))
    parser = argparse.ArgumentParser(description="Train Emu's visual decoder (stage 2).",
                                     epilog="Any config field can be overridden: --train.steps 2 --decoder.init DIR; "
                                            "--help-config lists them all (docs/config.md)")
    parser.add_argument("--config", required=True, help="YAML decoder job config (see configs/decoder_*.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action=HelpConfigAction, const=DecoderJobConfig)
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_decoder_config(args.config, overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(decoder_config_to_dict(cfg), sort_keys=False), end="")
            return 0
        check_local_paths(cfg)
    except (ConfigError, OSError) as err:
        return report(rank, f"config error: {err}", EXIT_CONFIG)
    setup_logging(rank)
    return run_with_exit_code(lambda: train(cfg), rank)


if __name__ == "__main__":
    sys.exit(main())
