"""Typed job configuration: dataclasses loaded from YAML, overridable from the command line.

    cfg = load_config("configs/tiny.yaml", ["--model.llm.num_layers", "2", "--train.steps=10"])

Every field is checked once, at load: unknown keys, wrong types and values outside a field's allowed
set raise ConfigError naming the dotted field and what is allowed. Cross-field rules live in
`Config.validate`.
"""
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the dotted field."""


# --------------------------------------------------------------------------- model


@dataclass
class VisionConfig:
    """EVA-CLIP-style ViT (SPEC component 1). Output: all 1 + (image_size/patch_size)^2 tokens."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    num_layers: int = 40
    num_heads: int = 16
    mlp_hidden: int = 6144
    norm_eps: float = 1e-6
    freeze: bool = False  # the ViT and ln_visual get no gradient and no update
    # Pretrained weights: a safetensors file from `python -m emu_mc.convert eva-to-emu`; "" = random init.
    init_from: str = ""


@dataclass
class ResamplerConfig:
    """T5-decoder-style Causal Transformer (SPEC component 3)."""

    num_queries: int = 32
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    d_kv: int = 64
    d_ff: int = 3072
    num_buckets: int = 32
    max_distance: int = 128
    dropout: float = 0.1
    norm_eps: float = 1e-6
    # auto: the Triton kernel on CUDA, the PyTorch reference elsewhere.
    attention_impl: Literal["auto", "triton", "reference"] = "auto"
    freeze: bool = False


@dataclass
class LLMConfig:
    """LLaMA-style decoder run as a megatron-core GPTModel (SPEC component 4)."""

    num_layers: int = 40
    hidden_size: int = 5120
    num_attention_heads: int = 40
    num_query_groups: Optional[int] = None  # None = multi-head attention (no GQA)
    ffn_hidden_size: int = 13824
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # The vocabulary comes from the tokenizer; the embedding is padded to a multiple of this x TP.
    make_vocab_size_divisible_by: int = 128
    # Attention over packed documents (emu_mc/model/document_attention.py): flex (FlexAttention, CUDA),
    # te (Transformer Engine, THD), flash_varlen (flash-attn), sdpa (torch SDPA per document bucket, CPU),
    # local (megatron's unfused attention with a dense [B, 1, S, S] mask: the reference);
    # auto: te > flash_varlen > flex on CUDA, sdpa without CUDA. Checkpoints are the same for all.
    attention_impl: Literal["auto", "flex", "te", "flash_varlen", "sdpa", "local"] = "auto"
    freeze: bool = False
    # Pretrained weights: a directory from `python -m emu_mc.convert hf-to-emu`; "" = random init.
    # Its architecture fields must match these; vocab rows it lacks (added special tokens) start at zero.
    init_from: str = ""


@dataclass
class LossConfig:
    """Total = ce_weight * CE(text) + reg_weight * l2(visual) (SPEC "The objective")."""

    ce_weight: float = 1.0
    reg_weight: float = 1.0
    # auto: the fused Triton loss on CUDA, the PyTorch reference elsewhere.
    impl: Literal["auto", "triton", "reference"] = "auto"


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # A local HF tokenizer directory; "tiny" means the small tokenizer shipped in emu_mc/assets.
    tokenizer: str = "tiny"
    init_std: float = 0.02


# --------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    """One pretraining source: WebDataset tar shards of one kind, sampled with `weight`.

    Kinds (sample layouts in emu_mc/data/sources.py): image_text (LAION: jpg|png|webp + txt|json),
    interleaved (MMC4: json text_list/image_info + images), video_text (WebVid: mp4|webm + txt|json),
    video_interleaved (YT-Storyboard: {i}.jpg|png frames, {i}.txt subtitles, json timestamps).
    """

    kind: Literal["image_text", "interleaved", "video_text", "video_interleaved"] = "image_text"
    # Local tar files: a path, a glob, or a brace pattern like data/laion-{000000..000009}.tar;
    # several patterns may be joined with "::".
    shards: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    # synthetic: random tokens and images, no files (unit tests, quick smoke runs).
    kind: Literal["synthetic", "webdataset"] = "synthetic"
    sources: List[SourceConfig] = field(default_factory=list)
    seq_length: int = 128
    micro_batch_size: int = 2
    # Frames sampled uniformly from each video_text clip, one image block each (the released model: 8).
    frames_per_video: int = 8
    # auto: dali_gpu when CUDA is available, else cpu. cpu: PIL for images, PyAV for video.
    # dali_cpu: DALI's CPU operators (VP8/VP9/MJPEG video; H.264/MPEG-4 still go through PyAV).
    # dali_gpu: nvJPEG + NVDEC + resize/normalise on the GPU.
    decoder: Literal["auto", "cpu", "dali_cpu", "dali_gpu"] = "auto"
    num_workers: int = 2  # decode threads; 0 decodes in the calling thread
    prefetch: int = 4  # samples decoded ahead, per source
    # A sample not read and decoded this many seconds after the loader starts waiting for it is skipped
    # (reason "timeout"; its thread is abandoned); when every worker thread is stuck the run stops with
    # an error. 0 = wait forever. Needs num_workers >= 1 (the calling thread cannot be abandoned).
    sample_timeout_s: float = 120.0
    # Stop with an error once more than this fraction of the samples read were skipped as bad,
    # checked after `failure_check_after` samples.
    max_failure_fraction: float = 0.1
    failure_check_after: int = 100
    # A document longer than seq_length: truncate (never inside an image block) or skip (counted).
    overlong: Literal["truncate", "skip"] = "truncate"
    images_per_synthetic_sample: int = 1


# --------------------------------------------------------------------------- training


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Microbatches per optimizer step and data-parallel rank (gradient accumulation).
    num_microbatches: int = 1
    # Shard optimizer state and fp32 main weights across data-parallel ranks (megatron-core
    # DistributedOptimizer); off: every DP rank keeps a full copy.
    distributed_optimizer: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    warmup_steps: int = 100
    grad_clip: float = 1.0
    # Per-component multipliers of lr and weight_decay: vision encoder (+ ln_visual), resampler,
    # LLM, heads (regression head; the LM output layer belongs to the LLM). Norm weights and biases
    # never decay.
    lr_scale_vision: float = 1.0
    lr_scale_resampler: float = 1.0
    lr_scale_llm: float = 1.0
    lr_scale_heads: float = 1.0
    wd_scale_vision: float = 1.0
    wd_scale_resampler: float = 1.0
    wd_scale_llm: float = 1.0
    wd_scale_heads: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 1234
    precision: Literal["fp32", "bf16"] = "fp32"
    log_every: int = 1
    out_dir: str = "runs/default"
    checkpoint_every: int = 0  # 0 = only at the end and on SIGTERM
    keep_checkpoints: int = 2
    # How the distributed optimizer's state is laid out on disk (megatron-core sharding types):
    # fully_reshardable: one tensor per parameter, resumes on any TP x PP x DP layout (gathers the
    #   optimizer state on DP rank 0 while saving); needs the apex/TE fused Adam (megatron-core 0.16's
    #   loader fails on torch.optim.Adam's per-parameter `step`);
    # dp_reshardable: each rank writes its own shard, no gather; resumes with the same TP x PP, any DP;
    # auto: fully_reshardable with apex/TE, dp_reshardable otherwise (CPU).
    optimizer_checkpoint: Literal["auto", "fully_reshardable", "dp_reshardable"] = "auto"
    max_consecutive_nonfinite: int = 5
    recompute_activations: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        """Cross-field rules that a single field's type cannot express."""
        v, r, llm = self.model.vision, self.model.resampler, self.model.llm
        _require(v.image_size % v.patch_size == 0, "model.vision.image_size", "a multiple of patch_size")
        _require(v.width % v.num_heads == 0, "model.vision.width", "divisible by model.vision.num_heads")
        _require(llm.hidden_size % llm.num_attention_heads == 0, "model.llm.hidden_size",
                 "divisible by model.llm.num_attention_heads")
        if llm.num_query_groups is not None:
            _require(llm.num_attention_heads % llm.num_query_groups == 0, "model.llm.num_query_groups",
                     "a divisor of model.llm.num_attention_heads")
        _require(self.data.seq_length <= llm.max_position_embeddings, "data.seq_length",
                 f"<= model.llm.max_position_embeddings ({llm.max_position_embeddings})")
        _require(self.data.seq_length >= r.num_queries + 3, "data.seq_length",
                 f">= {r.num_queries + 3} (one image block: [IMG] + num_queries x <image> + [/IMG] + 1)")
        for name in ("tensor_parallel", "pipeline_parallel", "num_microbatches"):
            _require(getattr(self.parallel, name) >= 1, f"parallel.{name}", ">= 1")
        _require(0.0 <= r.dropout < 1.0, "model.resampler.dropout", "in [0, 1)")
        _require(0.0 <= self.data.max_failure_fraction <= 1.0, "data.max_failure_fraction", "in [0, 1]")
        d = self.data
        _require(self.train.steps >= 1, "train.steps", ">= 1")
        _require(self.train.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1")
        _require(self.train.checkpoint_every >= 0, "train.checkpoint_every", ">= 0 (0 = only at the end and on SIGTERM)")
        _require(self.train.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", ">= 1")
        _require(d.micro_batch_size >= 1, "data.micro_batch_size", ">= 1")
        _require(d.frames_per_video >= 1, "data.frames_per_video", ">= 1")
        _require(d.num_workers >= 0, "data.num_workers", ">= 0")
        _require(d.prefetch >= 1, "data.prefetch", ">= 1")
        _require(d.sample_timeout_s >= 0, "data.sample_timeout_s", ">= 0 (0 = no timeout)")
        _require(d.failure_check_after >= 1, "data.failure_check_after", ">= 1")
        if d.kind == "webdataset":
            _require(len(d.sources) > 0, "data.sources", "at least one source when data.kind is webdataset")
            for i, src in enumerate(d.sources):
                _require(src.shards.strip() != "", f"data.sources[{i}].shards", "a path, glob or brace pattern")
                _require(src.weight >= 0.0, f"data.sources[{i}].weight", ">= 0")
            _require(sum(src.weight for src in d.sources) > 0, "data.sources", "at least one source with weight > 0")
        return self


def _require(ok: bool, name: str, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: must be {allowed}")


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (int -> float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(item, args[0], f"{name}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is float and not isinstance(value, bool):
        try:  # YAML reads 1e-3 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown field; allowed here: {names}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(args: Sequence[str]) -> Dict[str, Any]:
    """`--a.b 3 --c.d=x` -> {"a.b": 3, "c.d": "x"}; values are parsed as YAML scalars/lists."""
    out: Dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --dotted.field VALUE")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg}: missing value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        out[key] = yaml.safe_load(raw)
    return out


def config_from_dict(tree: Dict[str, Any]) -> Config:
    return _build(Config, tree, "").validate()


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Read YAML at `path` (or defaults), apply dotted CLI overrides, validate. Raises ConfigError."""
    tree: Dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    for key, value in parse_overrides(list(overrides)).items():
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)
