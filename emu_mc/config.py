"""Typed job configuration: dataclasses loaded from YAML, overridable from the command line.

    cfg = load_config("configs/tiny.yaml", ["--model.llm.num_layers", "2", "--train.steps=10"])
    cfg = load_config("configs/tiny.yaml", ["--data.sources.0.shards", "/data/laion-{000..009}.tar"])

Every field is checked once, at load: unknown keys, wrong types and values outside a field's allowed
set raise ConfigError naming the dotted field and what is allowed. Cross-field rules live in
`Config.validate`. The reference of every field (docs/config.md, `--help-config`) is generated from
these dataclasses and their comments by emu_mc/config_docs.py.
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
    """EVA-CLIP-style ViT (docs/model.md, component 1). Output: all 1 + (image_size/patch_size)^2 tokens."""

    image_size: int = 224  # input resolution (square), pixels
    patch_size: int = 14  # patch side, pixels; image_size must be a multiple
    width: int = 1408  # ViT hidden size
    num_layers: int = 40  # ViT blocks
    num_heads: int = 16  # attention heads; must divide width
    mlp_hidden: int = 6144  # MLP hidden size
    norm_eps: float = 1e-6  # LayerNorm epsilon (also ln_visual's)
    freeze: bool = False  # the ViT and ln_visual get no gradient and no update
    # Pretrained weights: a safetensors file from `python -m emu_mc.convert eva-to-emu`; "" = random init.
    init_from: str = ""


@dataclass
class ResamplerConfig:
    """T5-decoder-style Causal Transformer (docs/model.md, component 3)."""

    num_queries: int = 32  # learned queries = visual embeddings (<image> slots) per image
    d_model: int = 768  # hidden size
    num_layers: int = 12  # decoder layers (self-attention, cross-attention, FFN)
    num_heads: int = 12  # attention heads
    d_kv: int = 64  # per-head width of q, k and v
    d_ff: int = 3072  # ReLU FFN hidden size
    num_buckets: int = 32  # T5 relative-position buckets of the self-attention bias
    max_distance: int = 128  # distance beyond which T5 buckets saturate
    dropout: float = 0.1  # dropout in training, in [0, 1)
    norm_eps: float = 1e-6  # T5 RMS norm epsilon
    # auto: the Triton kernel on CUDA, the PyTorch reference elsewhere.
    attention_impl: Literal["auto", "triton", "reference"] = "auto"
    freeze: bool = False  # the resampler gets no gradient and no update


@dataclass
class LLMConfig:
    """LLaMA-style decoder run as a megatron-core GPTModel (docs/model.md, component 4)."""

    num_layers: int = 40  # transformer layers
    hidden_size: int = 5120  # model width
    num_attention_heads: int = 40  # query heads; must divide hidden_size
    num_query_groups: Optional[int] = None  # None = multi-head attention (no GQA)
    ffn_hidden_size: int = 13824  # SwiGLU hidden size
    norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    max_position_embeddings: int = 2048  # longest sequence (data.seq_length must not exceed it)
    tie_word_embeddings: bool = False  # output layer shares the input embedding
    # The vocabulary comes from the tokenizer; the embedding is padded to a multiple of this x TP.
    make_vocab_size_divisible_by: int = 128
    # Attention over packed documents (emu_mc/model/document_attention.py): flex (FlexAttention, CUDA),
    # te (Transformer Engine, THD), flash_varlen (flash-attn), sdpa (torch SDPA per document bucket, CPU),
    # local (megatron's unfused attention with a dense [B, 1, S, S] mask: the reference);
    # auto: te > flash_varlen > flex on CUDA, sdpa without CUDA. Checkpoints are the same for all.
    attention_impl: Literal["auto", "flex", "te", "flash_varlen", "sdpa", "local"] = "auto"
    freeze: bool = False  # the LLM gets no gradient and no update
    # Pretrained weights: a directory from `python -m emu_mc.convert hf-to-emu`; "" = random init.
    # Its architecture fields must match these; vocab rows it lacks (added special tokens) start at the mean of its rows.
    init_from: str = ""


@dataclass
class LossConfig:
    """Total = ce_weight * CE(text) + reg_weight * l2(visual) (docs/model.md "The objective")."""

    ce_weight: float = 1.0  # weight of the text cross-entropy
    reg_weight: float = 1.0  # weight of the visual-embedding regression (l2)
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
    # Add Emu-I's turn tokens [USER] and [ASSISTANT] after the tokenizer's others (the release's order;
    # one that has them keeps their ids). Needed by chat sources; rows that a model loaded from
    # init_from lacks start at the mean of its rows, as the release initialised them.
    chat_tokens: bool = False
    # std of the normal init of the LLM's and ViT's weight matrices and of the resampler's queries (the
    # rest of the resampler follows T5's init, the regression head nn.Linear's default, as released)
    init_std: float = 0.02
    # A whole model (every component's weights; its architecture fields must match these): a directory from
    # `python -m emu_mc.convert export --to emu` or `emu1-to-emu`, or a pretraining / full fine-tuning run
    # (its out_dir, which follows `latest`, or a step_N/ directory; same vocabulary size);
    # "" = random init, or the per-component init_from below.
    init_from: str = ""


# --------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    """One pretraining source: WebDataset tar shards of one kind, sampled with `weight`.

    Kinds (sample layouts in emu_mc/data/sources.py): image_text (LAION: jpg|png|webp + txt|json),
    interleaved (MMC4: json text_list/image_info + images), video_text (WebVid: mp4|webm + txt|json),
    video_interleaved (YT-Storyboard: {i}.jpg|png frames, {i}.txt subtitles, json timestamps),
    chat (instruction tuning: json conversations + images/videos, emu_mc/data/chat.py; docs/chat_data.md).
    """

    # The sample layout of the shards.
    kind: Literal["image_text", "interleaved", "video_text", "video_interleaved", "chat"] = "image_text"
    # Tar shards: local files (a path, a glob, or a brace pattern like data/laion-{000000..000009}.tar),
    # `pipe:COMMAND` (its stdout is the tar), http(s):// URLs, or s3:// / gs:// objects (fsspec with
    # s3fs / gcsfs). Brace patterns expand in all of them; several patterns may be joined with "::".
    # Relative paths resolve against the working directory.
    shards: str = ""
    weight: float = 1.0  # mixture weight (relative; 0 = unused)


@dataclass
class DataConfig:
    # synthetic: random tokens and images, no files (unit tests, quick smoke runs).
    kind: Literal["synthetic", "webdataset"] = "synthetic"
    # The webdataset sources (fields: data.sources.N.*); at least one when kind is webdataset.
    sources: List[SourceConfig] = field(default_factory=list)
    seq_length: int = 128  # tokens per packed row
    micro_batch_size: int = 2  # rows per microbatch and data-parallel rank
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
    # A shard not opened and indexed within it (a FIFO, a hung mount) counts as unreadable (any num_workers).
    sample_timeout_s: float = 120.0
    # Stop with an error once more than this fraction of the samples read were skipped as bad,
    # checked after `failure_check_after` samples.
    max_failure_fraction: float = 0.1
    failure_check_after: int = 100  # samples read before max_failure_fraction is checked
    # Remote shards (`pipe:COMMAND`, http(s)://, s3://, gs://; README "Data in object storage") are
    # copied to local disk when opened. A copy that fails or stalls is retried this many times with
    # exponential backoff (0.5 s, 1 s, 2 s, ... up to 30 s), then the shard is skipped and counted.
    remote_retries: int = 3
    # A remote shard whose stream sends no byte for this many seconds is given up (then retried).
    # 0 = wait forever.
    remote_timeout_s: float = 60.0
    # Open the first shard of every source before any process group starts (remote shards are
    # fetched: a wrong URL, bucket or credential stops the run at once, with exit code 2).
    check_remote: bool = False
    # Where the local copies of remote shards go ("" = the system temp dir, $TMPDIR). The copies are
    # unlinked files: each takes a shard's size while it is read (three per source and rank at most:
    # the one being fetched ahead and the last two opened).
    spool_dir: str = ""
    # A document longer than seq_length: truncate (never inside an image block) or skip (counted).
    overlong: Literal["truncate", "skip"] = "truncate"
    images_per_synthetic_sample: int = 1  # image blocks per row with kind synthetic


# --------------------------------------------------------------------------- training


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1  # TP size: the LLM's layers split over this many GPUs
    pipeline_parallel: int = 1  # PP size: the LLM's layers split in stages
    # Microbatches per optimizer step and data-parallel rank (gradient accumulation).
    num_microbatches: int = 1
    # Shard optimizer state and fp32 main weights across data-parallel ranks (megatron-core
    # DistributedOptimizer); off: every DP rank keeps a full copy.
    distributed_optimizer: bool = True
    # The vision side (ViT, ln_visual, resampler) over TP ranks: split = each rank encodes its share
    # of the microbatch's images, the visual embeddings are all-gathered and the vision gradients
    # summed over TP; replicated = every TP rank encodes every image (the old layout, for comparison).
    vision_layout: Literal["split", "replicated"] = "split"
    # LLM layers on the first / last pipeline stage (PP > 1 only; null = an even share). The first
    # stage also runs the vision side, the last the loss: give them fewer layers. The layers left must
    # divide evenly over the middle stages.
    llm_layers_first_stage: Optional[int] = None
    llm_layers_last_stage: Optional[int] = None  # LLM layers on the last pipeline stage (PP > 1; null = an even share)


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate (after warmup)
    min_lr: float = 1e-5  # learning rate at the end of the cosine
    weight_decay: float = 0.05  # AdamW weight decay (norms and biases never decay)
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.98  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    warmup_steps: int = 100  # linear warmup steps
    # The step at which the cosine reaches min_lr (constant after it); None = train.steps. Set it when
    # raising train.steps to continue a run, or the cosine is re-stretched (a warning on resume says so).
    decay_steps: Optional[int] = None
    grad_clip: float = 1.0  # global gradient-norm clip over all groups; 0 = off
    # Per-component multipliers of lr and weight_decay: vision encoder (+ ln_visual), resampler,
    # LLM, heads (regression head; the LM output layer belongs to the LLM). Norm weights and biases
    # never decay.
    lr_scale_vision: float = 1.0
    lr_scale_resampler: float = 1.0  # lr multiplier of the resampler
    lr_scale_llm: float = 1.0  # lr multiplier of the LLM
    lr_scale_heads: float = 1.0  # lr multiplier of the regression head
    wd_scale_vision: float = 1.0  # weight-decay multiplier of the vision encoder
    wd_scale_resampler: float = 1.0  # weight-decay multiplier of the resampler
    wd_scale_llm: float = 1.0  # weight-decay multiplier of the LLM
    wd_scale_heads: float = 1.0  # weight-decay multiplier of the regression head


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps of the run (raise it to continue from a checkpoint)
    seed: int = 1234  # seeds init, data order and dropout
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 on GPU (mixed precision, fp32 main weights); fp32 on CPU
    log_every: int = 1  # steps between console lines (metrics.jsonl gets every step)
    out_dir: str = "runs/default"  # metrics, TensorBoard logs and checkpoints; a rerun resumes from here
    checkpoint_every: int = 0  # 0 = only at the end and on SIGTERM
    keep_checkpoints: int = 2  # newest checkpoints kept
    # How the distributed optimizer's state is laid out on disk (megatron-core sharding types):
    # fully_reshardable: one tensor per parameter, resumes on any TP x PP x DP layout (gathers the
    #   optimizer state on DP rank 0 while saving); needs the apex/TE fused Adam (megatron-core 0.16's
    #   loader fails on torch.optim.Adam's per-parameter `step`);
    # dp_reshardable: each rank writes its own shard, no gather; resumes with the same TP x PP, any DP;
    # auto: fully_reshardable with apex/TE, dp_reshardable otherwise (CPU).
    optimizer_checkpoint: Literal["auto", "fully_reshardable", "dp_reshardable"] = "auto"
    max_consecutive_nonfinite: int = 5  # non-finite steps in a row that stop the run
    recompute_activations: bool = False  # recompute the LLM's layers in backward (less memory)
    # Recompute the vision side in backward: each ViT block and the resampler (activation checkpointing).
    recompute_vision: bool = False
    profile_step: int = 0  # > 0: profile that step (torch.profiler) into out_dir/profile_step<N>_rank<R>.txt
    # Write a checkpoint when train.steps is reached (off for benchmarks: no minute-long save at the
    # end); checkpoint_every and the stop checkpoint on SIGTERM / Ctrl-C are unaffected.
    save_final: bool = True


@dataclass
class FinetuneConfig:
    """Instruction tuning (emu_mc/finetune.py; README "Instruction tuning"): from the weights of
    model.init_from (or model.llm.init_from), LoRA adapters on the LLM's attention or the full model.
    Absent (null) in pretraining configs; finetune.py gives a config without it these defaults."""

    # lora: low-rank adapters on the LLM's attention q, k, v and o (per projection, as the released Emu-I);
    # every other weight is frozen and checkpoints hold the adapters only. full: every weight trains
    # (model.*.freeze still apply) and checkpoints are whole, as in pretraining.
    mode: Literal["lora", "full"] = "lora"
    lora_rank: int = 16  # r, the adapters' inner width
    lora_alpha: float = 16.0  # the adapters' update B A x is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.05  # dropout on the adapters' input (training only), in [0, 1)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: Optional[FinetuneConfig] = None  # instruction tuning (emu_mc/finetune.py); null for pretraining

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
        _require(not (self.model.init_from and (llm.init_from or v.init_from)), "model.init_from",
                 "empty when model.llm.init_from or model.vision.init_from is set (one source of weights)")
        _require(self.data.seq_length <= llm.max_position_embeddings, "data.seq_length",
                 f"<= model.llm.max_position_embeddings ({llm.max_position_embeddings})")
        _require(self.data.seq_length >= r.num_queries + 4, "data.seq_length",
                 f">= {r.num_queries + 4} (<s> + one image block: [IMG] + num_queries x <image> + [/IMG] + </s>)")
        for name in ("tensor_parallel", "pipeline_parallel", "num_microbatches"):
            _require(getattr(self.parallel, name) >= 1, f"parallel.{name}", ">= 1")
        _check_stage_layers(self.parallel, llm.num_layers)
        tp = self.parallel.tensor_parallel
        _require(llm.num_attention_heads % tp == 0, "model.llm.num_attention_heads",
                 f"divisible by parallel.tensor_parallel ({tp})")
        if llm.num_query_groups is not None:
            _require(llm.num_query_groups % tp == 0, "model.llm.num_query_groups",
                     f"divisible by parallel.tensor_parallel ({tp}) (each TP rank holds whole key/value groups)")
        _require(0.0 <= r.dropout < 1.0, "model.resampler.dropout", "in [0, 1)")
        _require(0.0 <= self.data.max_failure_fraction <= 1.0, "data.max_failure_fraction", "in [0, 1]")
        if self.finetune is not None:
            _check_finetune(self.finetune, self.model)
        d = self.data
        check_run_fields(self.train, self.optim)
        _require(d.micro_batch_size >= 1, "data.micro_batch_size", ">= 1")
        _require(d.frames_per_video >= 1, "data.frames_per_video", ">= 1")
        _require(d.num_workers >= 0, "data.num_workers", ">= 0")
        _require(d.prefetch >= 1, "data.prefetch", ">= 1")
        _require(d.sample_timeout_s >= 0, "data.sample_timeout_s", ">= 0 (0 = no timeout)")
        _require(d.failure_check_after >= 1, "data.failure_check_after", ">= 1")
        _require(d.remote_retries >= 0, "data.remote_retries", ">= 0")
        _require(d.remote_timeout_s >= 0, "data.remote_timeout_s", ">= 0 (0 = no timeout)")
        if d.kind == "webdataset":
            _require(len(d.sources) > 0, "data.sources", "at least one source when data.kind is webdataset")
            for i, src in enumerate(d.sources):
                _require(src.shards.strip() != "", f"data.sources[{i}].shards",
                         "a path, glob or brace pattern, pipe:COMMAND or a URL")
                _require(src.weight >= 0.0, f"data.sources[{i}].weight", ">= 0")
                _require(src.kind != "chat" or self.model.chat_tokens, "model.chat_tokens",
                         f"true when data.sources[{i}].kind is chat (the [USER] / [ASSISTANT] turn tokens)")
            _require(sum(src.weight for src in d.sources) > 0, "data.sources", "at least one source with weight > 0")
        return self


def check_run_fields(train: TrainConfig, optim: OptimConfig) -> None:
    """The rules on the run and optimizer sections, which every training stage shares."""
    _require(train.steps >= 1, "train.steps", ">= 1")
    _require(optim.decay_steps is None or optim.decay_steps >= 1, "optim.decay_steps", ">= 1, or null for train.steps")
    _require(train.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1")
    _require(train.checkpoint_every >= 0, "train.checkpoint_every", ">= 0 (0 = only at the end and on SIGTERM)")
    _require(train.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", ">= 1")
    _require(train.profile_step >= 0, "train.profile_step", ">= 0 (0 = off)")


def _check_finetune(f: FinetuneConfig, model: ModelConfig) -> None:
    _require(f.lora_rank >= 1, "finetune.lora_rank", ">= 1")
    _require(f.lora_alpha > 0, "finetune.lora_alpha", "> 0")
    _require(0.0 <= f.lora_dropout < 1.0, "finetune.lora_dropout", "in [0, 1)")
    _require(bool(model.init_from or model.llm.init_from), "model.init_from",
             "the weights to fine-tune when finetune is set: a pretraining run (its out_dir or a step_N/ "
             "directory), a `convert export --to emu` or `emu1-to-emu` directory; or set model.llm.init_from")


def _check_stage_layers(p: ParallelConfig, num_layers: int) -> None:
    """The uneven first/last pipeline stages leave a whole number of layers for each middle stage."""
    if p.pipeline_parallel == 1:
        return
    first, last = p.llm_layers_first_stage, p.llm_layers_last_stage
    for name, value in (("llm_layers_first_stage", first), ("llm_layers_last_stage", last)):
        _require(value is None or value >= 1, f"parallel.{name}", ">= 1 or null (an even share)")
    if first is None and last is None:
        _require(num_layers % p.pipeline_parallel == 0, "model.llm.num_layers",
                 f"divisible by parallel.pipeline_parallel ({p.pipeline_parallel}), or set "
                 "parallel.llm_layers_first_stage / llm_layers_last_stage")
        return
    middle_layers = num_layers - (first or 0) - (last or 0)
    middle_stages = p.pipeline_parallel - (first is not None) - (last is not None)
    _require(middle_layers >= 0, "parallel.llm_layers_first_stage",
             f"plus parallel.llm_layers_last_stage ({last}) at most model.llm.num_layers ({num_layers})")
    ok = middle_layers % middle_stages == 0 and middle_layers > 0 if middle_stages else middle_layers == 0
    _require(ok, "parallel.llm_layers_first_stage",
             f"such that the other {middle_layers} of model.llm.num_layers ({num_layers}) split evenly over the "
             f"{middle_stages} other stage(s) (parallel.llm_layers_last_stage: {last})")


# A typical document of each source kind: image blocks (video_text: one per sampled frame) plus about
# this many text tokens (a short caption, a paragraph chunk, a subtitle) plus <s> and </s>.
_TYPICAL_TEXT_TOKENS = 16


def document_fit_warnings(cfg: Config) -> List[str]:
    """One line per source whose typical document does not fit in data.seq_length: such a run would
    drop most documents (empty_document) or their images, a few steps in. Empty when all fit."""
    d, block = cfg.data, cfg.model.resampler.num_queries + 2
    blocks = {"image_text": 1, "interleaved": 1, "video_text": d.frames_per_video, "video_interleaved": 1, "chat": 1}
    warnings = []
    for i, src in enumerate(d.sources if d.kind == "webdataset" else []):
        need = 2 + blocks[src.kind] * block + _TYPICAL_TEXT_TOKENS
        if src.weight > 0 and d.seq_length < need:
            warnings.append(f"data.seq_length {d.seq_length} cannot hold a typical {src.kind} document of "
                            f"data.sources[{i}] ({blocks[src.kind]} image block(s) of {block} tokens + ~"
                            f"{_TYPICAL_TEXT_TOKENS} text tokens + <s></s> = {need}): most of its documents will "
                            f"be dropped or lose their images; raise data.seq_length to >= {need}")
    return warnings


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
    """tree[a][b]... = value for "a.b..."; a number indexes a list (data.sources.0.shards), and the
    list's length appends an item."""
    keys = dotted.split(".")
    node: Any = tree
    for depth, key in enumerate(keys):
        if isinstance(node, list):
            if not key.isdigit() or int(key) > len(node):
                raise ConfigError(f"{dotted}: {key!r} is not an item of this list ({len(node)} items; "
                                  f"index {len(node)} appends one)")
            key = int(key)
            if key == len(node):
                node.append({})
        elif not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {'.'.join(keys[:depth])} is not a section")
        if depth == len(keys) - 1:
            node[key] = value
        else:
            child = node[key] if isinstance(node, list) else node.get(key)
            if child is None:
                child = node[key] = [] if keys[depth + 1].isdigit() else {}
            node = child


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
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override {arg}: missing value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        out[key] = _yaml(raw, f"override --{key}")
    return out


def _yaml(text: str, where: str) -> Any:
    """yaml.safe_load, its syntax errors as one-line ConfigErrors naming `where` and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}:{at}: YAML syntax error: {problem}") from None


def config_from_dict(tree: Dict[str, Any]) -> Config:
    return _build(Config, tree, "").validate()


def load_tree(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The YAML at `path` (or {}) with dotted CLI overrides applied, not yet typed. Raises ConfigError."""
    tree: Dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            tree = _yaml(f.read(), path) or {}
    for key, value in parse_overrides(list(overrides)).items():
        _set_dotted(tree, key, value)
    return tree


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), finetune: bool = False) -> Config:
    """Read YAML at `path` (or defaults), apply dotted CLI overrides, validate. Raises ConfigError.
    `finetune`: the finetune section gets its defaults when the YAML has none."""
    tree = load_tree(path, overrides)
    if finetune and tree.get("finetune") is None:
        tree["finetune"] = {}
    return config_from_dict(tree)


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)
