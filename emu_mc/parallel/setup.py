"""Model, optimizer and one training step under megatron-core TP x PP x DP.

Layout (see EmuModel's docstring for what each pipeline stage holds):
- the LLM is megatron-sharded over TP and split in layers over PP (`parallel.llm_layers_first_stage`
  / `llm_layers_last_stage` make the first and last stages uneven); vision encoder, ln_visual,
  resampler and regression head are replicated over TP (they are small next to the LLM). Their
  replicas start identical (`_sync_replicas`) and stay identical: they end every step with the same
  gradients and run the same optimizer update. With `parallel.vision_layout: split` each TP rank
  encodes only its share of the images (emu_mc/parallel/vision_split.py), so its vision gradients
  cover its images only and `finalize_grads` sums them over TP; the regression head sees the same
  inputs on every TP rank;
- megatron-core DDP reduces gradients over DP in fp32 grad buffers; its DistributedOptimizer shards
  the Adam state and fp32 main weights over DP (`parallel.distributed_optimizer`);
- megatron-core's pipeline schedules (`get_forward_backward_func`: no pipelining for PP = 1, 1F1B
  otherwise) run the microbatches of one step; the regression targets travel from the first to the
  last stage through `RegressionTargetChannel`;
- gradient clipping uses the global norm over all TP/PP/DP shards (megatron counts TP-replicated
  parameters once).
"""
import logging
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from emu_mc.batch import Batch
from emu_mc.config import Config
from emu_mc.metrics import RegionTimer
from emu_mc.model.emu import EmuModel
from emu_mc.model.targets import with_loss_rows
from emu_mc.parallel.pipeline import RegressionTargetChannel
from emu_mc.parallel.vision_split import sum_grads_over_tp
from emu_mc.tokenizer import SpecialTokenIds

log = logging.getLogger("emu_mc.parallel")

COMPONENTS = ("vision", "resampler", "llm", "heads")
_COMPONENT_PREFIXES = {"vision.": "vision", "ln_visual.": "vision", "resampler.": "resampler", "llm.": "llm",
                       "regress_head.": "heads"}


def component_of(param_name: str) -> str:
    """Which optimizer component a parameter belongs to, from its name (a DDP 'module.' prefix allowed)."""
    name = param_name[len("module."):] if param_name.startswith("module.") else param_name
    for prefix, component in _COMPONENT_PREFIXES.items():
        if name.startswith(prefix):
            return component
    raise ValueError(f"parameter {param_name!r} belongs to no optimizer component {COMPONENTS}")


def decays(param: torch.Tensor, param_name: str) -> bool:
    """Weight decay applies to matrices and embeddings, never to norm weights or biases."""
    return param.dim() >= 2 and not param_name.endswith(".bias")


def unwrap(chunk) -> EmuModel:
    """The EmuModel inside a DDP-wrapped model chunk."""
    return chunk.module if hasattr(chunk, "module") else chunk


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _sync_replicas(model: EmuModel) -> None:
    """Broadcast parameters so replicas are bit-identical: TP-replicated ones from TP rank 0 of the
    stage, all of them from DP rank 0 (independent of how each rank's RNG was seeded)."""
    from megatron.core import parallel_state as ps

    tp_group, dp_group = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()
    tp_src = dist.get_global_rank(tp_group, 0)
    dp_src = dist.get_global_rank(dp_group, 0)
    with torch.no_grad():
        for param in model.parameters():
            if ps.get_tensor_model_parallel_world_size() > 1 and not getattr(param, "tensor_model_parallel", False):
                dist.broadcast(param.data, tp_src, group=tp_group)
            if ps.get_data_parallel_world_size() > 1:
                dist.broadcast(param.data, dp_src, group=dp_group)


def build_model(cfg: Config, ids: SpecialTokenIds, vocab_size: int) -> EmuModel:
    """This rank's EmuModel stage on its device, replicas synchronised, pretrained weights loaded; with
    finetune.mode lora, fresh LoRA adapters (seeded by train.seed) on a frozen base."""
    from megatron.core import parallel_state as ps

    from emu_mc.model.lora import LoRASettings, init_adapters

    params_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    model = EmuModel(
        cfg.model, ids, vocab_size,
        tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        params_dtype=params_dtype, recompute=cfg.train.recompute_activations,
        recompute_vision=cfg.train.recompute_vision, split_vision=cfg.parallel.vision_layout == "split",
        stage_layers=(cfg.parallel.llm_layers_first_stage, cfg.parallel.llm_layers_last_stage),
        lora=LoRASettings.of(cfg.finetune),
    ).to(device())
    model.reg_target_channel = RegressionTargetChannel.create()
    model.vision_timer = RegionTimer() if model.pre_process else None
    _sync_replicas(model)
    _load_pretrained(model, cfg)
    if model.lora is not None:
        init_adapters(model.llm, cfg.train.seed)
    return model


def _load_pretrained(model: EmuModel, cfg: Config) -> None:
    try:
        from emu_mc.convert import load_pretrained
    except ImportError:  # the converters are optional for training from scratch
        return
    load_pretrained(model, cfg.model)


def _param_group_overrides(cfg: Config) -> Dict:
    """megatron ParamKey -> override, one per (component, decays?) pair: lr_mult and wd_mult."""
    from megatron.core.optimizer import ParamKey
    from megatron.core.optimizer.optimizer_config import ParamWithNamePredicate

    overrides = {}
    for component in COMPONENTS:
        for decay in (True, False):
            predicate = ParamWithNamePredicate(
                name=f"{component}_{'decay' if decay else 'no_decay'}",
                fn=lambda p, n, c=component, d=decay: component_of(n) == c and decays(p, n) == d)
            overrides[ParamKey(with_name_predicate=predicate)] = {
                "lr_mult": getattr(cfg.optim, f"lr_scale_{component}"),
                "wd_mult": getattr(cfg.optim, f"wd_scale_{component}") if decay else 0.0,
            }
    return overrides


def build_model_and_optimizer(cfg: Config, ids: SpecialTokenIds, vocab_size: int):
    """-> (model_chunks [DDP(EmuModel)], megatron optimizer). Sets the TransformerConfig hooks the
    pipeline schedules call (no_sync, finalize_model_grads, grad_scale_func)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = build_model(cfg, ids, vocab_size)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer)
    chunk = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    o = cfg.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
            adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.grad_clip, bf16=cfg.train.precision == "bf16",
            params_dtype=model.config.params_dtype, use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            loss_scale=1.0,  # a constant 1.0 scaler makes megatron check grads for inf/nan and skip the step
        ),
        [chunk],
        config_overrides=_param_group_overrides(cfg),
    )
    model.config.no_sync_func = chunk.no_sync
    model.config.finalize_model_grads_func = finalize_grads
    model.config.grad_scale_func = optimizer.scale_loss
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("stage params: %.2fM trainable of %.2fM; optimizer %s (%s)", trainable / 1e6,
             sum(p.numel() for p in model.parameters()) / 1e6, type(optimizer).__name__,
             "sharded over DP" if cfg.parallel.distributed_optimizer else "replicated")
    return [chunk], optimizer


def finalize_grads(model_chunks, *args, **kwargs) -> None:
    """megatron's finalize_model_grads (DP reduction, tied embeddings), then, where the vision side is
    split over TP, the sum of its gradients over the TP group (each rank's cover its own images)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model_chunks, *args, **kwargs)
    for chunk in model_chunks:
        model = unwrap(chunk)
        if model.split_vision:
            sum_grads_over_tp(model.vision_parameters(), ps.get_tensor_model_parallel_group())


def vision_seconds_per_tp_rank(model_chunks) -> List[float]:
    """Seconds each TP rank of this rank's pipeline stage spent in the vision side (forward and
    backward) since the previous call, in TP rank order; 0 off the first stage. Collective over TP;
    on CUDA call it after synchronising."""
    from megatron.core import parallel_state as ps

    mine = sum(unwrap(c).vision_timer.seconds() for c in model_chunks if unwrap(c).vision_timer is not None)
    gathered = torch.zeros(ps.get_tensor_model_parallel_world_size(), dtype=torch.float64, device=device())
    dist.all_gather_into_tensor(gathered, torch.tensor([mine], dtype=torch.float64, device=device()),
                                group=ps.get_tensor_model_parallel_group())
    return gathered.tolist()


def set_learning_rate(optimizer, lr: float) -> None:
    """Apply the scheduled base lr (and the base weight decay) times each group's component multipliers."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
        group["weight_decay"] = optimizer.config.weight_decay * group["wd_mult"]


def _forward_step(data_iterator, model) -> Tuple[torch.Tensor, callable]:
    """megatron schedule callback: one microbatch through this stage."""
    out = model(next(data_iterator))
    if isinstance(out, dict):  # last stage: the loss terms
        terms = {k: v.detach().clone() for k, v in out.items()}  # the schedule rescales the loss in place
        return out["loss"], lambda loss: (loss, terms)
    return out, None


def _last_stage_mean(terms: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """[loss, ce, reg] averaged over microbatches and DP ranks, the same on every rank (fp64)."""
    from megatron.core import parallel_state as ps

    values = torch.zeros(3, dtype=torch.float64, device=device())
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        values += torch.stack([torch.stack([t[k].double() for k in ("loss", "ce", "reg")]) for t in terms]).mean(0)
    dist.all_reduce(values)  # one contributor per DP rank
    return values / ps.get_data_parallel_world_size()


def forward_backward(model_chunks, microbatches: List[Batch]) -> torch.Tensor:
    """Zero the grads, run forward+backward over `microbatches` (each [micro_batch_size, seq_length])
    with megatron's schedule; grads end reduced over DP in each parameter's `main_grad`.
    Returns [loss, ce, reg] (fp64) averaged over microbatches and DP ranks, on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    batch_size, seq_length = microbatches[0].input_ids.shape
    ids = unwrap(model_chunks[0]).ids
    terms = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter([with_loss_rows(b, ids).to(device(), non_blocking=True) for b in microbatches]),
        model=model_chunks, num_microbatches=len(microbatches), seq_length=seq_length,
        micro_batch_size=batch_size, forward_only=False,
    )
    for chunk in model_chunks:
        channel = unwrap(chunk).reg_target_channel
        if channel is not None:
            channel.wait()
    return _last_stage_mean(terms)


def train_step(model_chunks, optimizer, microbatches: List[Batch], lr: float) -> Dict[str, float]:
    """`forward_backward` and one optimizer step at base learning rate `lr`. A non-finite loss or
    gradient skips the update on every rank. Returns the step's mean loss terms, the global grad
    norm (before clipping) and whether the update was skipped."""
    set_learning_rate(optimizer, lr)
    optimizer.zero_grad()
    loss, ce, reg = forward_backward(model_chunks, microbatches).tolist()
    if not torch.isfinite(torch.tensor(loss)):
        return {"loss": loss, "ce": ce, "reg": reg, "grad_norm": float("nan"), "skipped": True}
    updated, grad_norm, _ = optimizer.step()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    return {"loss": loss, "ce": ce, "reg": reg, "grad_norm": grad_norm, "skipped": not updated}
