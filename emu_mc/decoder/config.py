"""Typed config of a decoder-training job (configs/decoder_*.yaml), loaded and checked like the
pretraining config (emu_mc/config.py: same YAML loader, dotted overrides, one-line ConfigErrors). The
optimizer and run sections are pretraining's OptimConfig and TrainConfig.

    cfg = load_decoder_config("configs/decoder_tiny.yaml", ["--train.steps", "2"])
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence

from emu_mc.config import (ConfigError, OptimConfig, SourceConfig, TrainConfig, _build, _require, check_run_fields,
                           load_tree)


@dataclass
class EmuSourceConfig:
    """The frozen Emu that computes the conditions."""

    # A pretraining run's out_dir, its checkpoints/ directory or a step_N/ directory (emu_mc.inference.loading).
    checkpoint: str = ""
    tokenizer: str = ""  # overrides the checkpoint's model.tokenizer (a run moved to another machine); "" = keep


@dataclass
class UNetConfig:
    """The decoder being trained: a diffusers directory whose UNet reads the LLM width."""

    # A decoder directory (unet/, vae/, scheduler/): `python -m emu_mc.convert sd-to-decoder` output, or
    # `python -m emu_mc.inference.tiny_decoder` for CPU runs. Its UNet's cross_attention_dim must be the LLM width.
    init: str = ""
    resolution: int = 512  # training images: shorter side resized to this, then center-cropped square
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # the UNet's target
    # Share of conditions replaced by generation's unconditional one (Emu on an empty prompt), in [0, 1).
    cond_drop_prob: float = 0.1
    ema_decay: float = 0.0  # > 0: keep an EMA of the UNet weights (exported instead of the raw weights)
    # Data parallelism over all ranks. ddp: every rank holds the whole UNet, AdamW state and EMA. fsdp:
    # torch FSDP2, each rank holds 1/world of them (each UNet block gathered for its forward and backward),
    # for UNets whose training state does not fit one device. Same update; checkpoints load under either.
    parallel: Literal["ddp", "fsdp"] = "ddp"


@dataclass
class DecoderDataConfig:
    """Image-text WebDataset shards (the image_text layout of emu_mc/data/sources.py)."""

    sources: List[SourceConfig] = field(default_factory=list)  # image_text sources only, as pretraining's
    # A directory from `python -m emu_mc.decoder.precompute`: train on its conditions and VAE posteriors
    # (no Emu, no VAE in the loop); data.sources and emu.checkpoint are then unused. "" = online.
    precomputed: str = ""
    micro_batch_size: int = 4  # pairs per step and data-parallel rank
    # A document longer than this many tokens (caption + image block) is skipped (counted).
    max_caption_tokens: int = 64
    max_failure_fraction: float = 0.1  # stop once more than this share of the samples read were bad
    failure_check_after: int = 100  # samples read before max_failure_fraction is checked
    sample_timeout_s: float = 120.0  # a shard not opened within it counts as unreadable


@dataclass
class DecoderJobConfig:
    emu: EmuSourceConfig = field(default_factory=EmuSourceConfig)
    decoder: UNetConfig = field(default_factory=UNetConfig)
    data: DecoderDataConfig = field(default_factory=DecoderDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "DecoderJobConfig":
        d = self.data
        if not d.precomputed:
            _require(self.emu.checkpoint.strip() != "", "emu.checkpoint",
                     "a pretraining checkpoint (run dir or step_N/), or set data.precomputed")
            _require(len(d.sources) > 0, "data.sources", "at least one image_text source, or set data.precomputed")
        _require(self.decoder.init.strip() != "", "decoder.init", "a decoder directory (unet/, vae/, scheduler/)")
        _require(self.decoder.resolution >= 8, "decoder.resolution", ">= 8")
        _require(0.0 <= self.decoder.cond_drop_prob < 1.0, "decoder.cond_drop_prob", "in [0, 1)")
        _require(0.0 <= self.decoder.ema_decay < 1.0, "decoder.ema_decay", "in [0, 1) (0 = no EMA)")
        for i, src in enumerate(d.sources):
            _require(src.kind == "image_text", f"data.sources[{i}].kind", "image_text (decoder training reads pairs)")
            _require(src.shards.strip() != "", f"data.sources[{i}].shards", "a path, glob or brace pattern")
            _require(src.weight > 0.0, f"data.sources[{i}].weight", "> 0")
        _require(d.micro_batch_size >= 1, "data.micro_batch_size", ">= 1")
        _require(d.max_caption_tokens >= 1, "data.max_caption_tokens", ">= 1")
        _require(0.0 <= d.max_failure_fraction <= 1.0, "data.max_failure_fraction", "in [0, 1]")
        check_run_fields(self.train, self.optim)
        return self


def decoder_config_from_dict(tree: Dict[str, Any]) -> DecoderJobConfig:
    return _build(DecoderJobConfig, tree, "").validate()


def load_decoder_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> DecoderJobConfig:
    """Read YAML at `path`, apply dotted CLI overrides, validate. Raises ConfigError."""
    return decoder_config_from_dict(load_tree(path, overrides))


def decoder_config_to_dict(cfg: DecoderJobConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


__all__ = ["ConfigError", "DecoderJobConfig", "load_decoder_config", "decoder_config_to_dict"]
