"""LoRA adapters on the LLM's attention projections q, k, v and o (Emu-I; docs/model.md "Instruction tuning").

Per projection, as peft applies it to q_proj, k_proj, v_proj and o_proj:
    y = W x + (alpha / r) B A dropout(x),   A [r, in] (kaiming-uniform), B [out, r] (zero: a fresh
    adapter leaves the model as it was), each projection with its own A, B and dropout mask.

Megatron fuses q, k and v into one column-parallel `linear_qkv` whose output is laid out per query group
g: [q heads of g; k head g; v head g], each TP rank holding whole groups. `LoRAQKVLinear` keeps the
three adapters apart and writes their updates into that layout (`per_group_concat`), so its output is
per-projection LoRA on the unfused q, k, v. `LoRAProjLinear` adapts the row-parallel `linear_proj` (o).
Both are megatron's linear layers with the adapters added, swapped in through the layer spec
(emu_mc/model/llm_attention.py): the base weights keep their names and checkpoint layout.

Sharding follows the base weights (TP = tensor-parallel size):
- linear_qkv (input replicated over TP): A_q, A_k, A_v replicated; B_q, B_k, B_v split along their
  rows (this rank's heads). The r-wide products A x enter a TP copy region, whose backward all-reduces
  their gradient (each rank's B shard contributes a part): every rank gets the full A gradient.
- linear_proj (input split over TP by heads): A split along its input columns, B replicated; the
  partial products A_t x_t are summed over TP (an all-reduce of r-wide activations next to megatron's
  reduction of the base output), so B's gradient is the same on every rank.
Dropout masks are drawn at the full input width from the default generator (the same on every TP
rank) and sliced to this rank's columns: any TP layout computes the TP = 1 result.

Checkpoints shard B_q/B_k/B_v along rows and the proj's A along columns (megatron dist_checkpointing),
so adapters reshard to any TP x PP. `merge_adapters` folds (alpha / r) B A into each base weight and
removes the adapters: the modules then compute exactly what megatron's plain linears do.
"""
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, copy_to_tensor_model_parallel_region,
                                           reduce_from_tensor_model_parallel_region)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

PREFIX = "lora_"  # every adapter parameter's own name starts with it


@dataclass(frozen=True)
class LoRASettings:
    rank: int
    alpha: float
    dropout: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def of(cls, finetune) -> Optional["LoRASettings"]:
        """The settings of a FinetuneConfig in lora mode; None for full fine-tuning or pretraining (None)."""
        if finetune is None or finetune.mode != "lora":
            return None
        return cls(finetune.lora_rank, finetune.lora_alpha, finetune.lora_dropout)


def is_adapter(name: str) -> bool:
    """Whether a parameter / state-dict name (dotted, any prefix) is an adapter's."""
    return name.rsplit(".", 1)[-1].startswith(PREFIX)


def per_group_concat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """q [..., Nq d], k/v [..., G d] -> [..., (Nq + 2G) d] in megatron's fused layout, per query group
    [q heads of g; k head g; v head g] (`groups` = G, the groups held here)."""
    lead = q.shape[:-1]
    return torch.cat([t.reshape(*lead, groups, -1) for t in (q, k, v)], dim=-1).reshape(*lead, -1)


class _Adapters:
    """What both adapted linears share (a mixin before megatron's linear class): settings, dropout at
    full width, init, merge, checkpoint axes. Adapters are parameters named lora_*."""

    lora: Optional[LoRASettings]
    _adapter_axes: Dict[str, int]  # adapter name -> its TP-split axis (absent: replicated over TP)

    def _add_adapter(self, name: str, shape: Tuple[int, int], split_axis: Optional[int]) -> None:
        param = torch.nn.Parameter(torch.zeros(shape, dtype=self.weight.dtype, device=self.weight.device))
        if split_axis is not None:
            set_tensor_model_parallel_attributes(param, True, split_axis, 1)
            self._adapter_axes[name] = split_axis
        setattr(self, name, param)

    def adapter_names(self) -> List[str]:
        return [name for name, _ in self.named_parameters() if is_adapter(name)]

    def _tp(self) -> Tuple[int, int]:
        return torch.distributed.get_rank(self.tp_group), torch.distributed.get_world_size(self.tp_group)

    def _dropout(self, x: torch.Tensor, full_width: int) -> torch.Tensor:
        """x [..., w] (this rank's columns of a [..., full_width] input) with inverted dropout; the mask
        is drawn at full width and sliced, so it does not depend on the TP layout."""
        p = self.lora.dropout
        if p == 0.0 or not self.training:
            return x
        width = x.shape[-1]
        start = self._tp()[0] * width if width < full_width else 0
        keep = torch.empty(*x.shape[:-1], full_width, device=x.device, dtype=x.dtype).bernoulli_(1.0 - p)
        return x * keep[..., start:start + width] / (1.0 - p)

    @torch.no_grad()
    def reset_adapters(self, generator: torch.Generator) -> None:
        """A kaiming-uniform at full width (nn.Linear's default: U(+-1/sqrt(in))), this rank's slice of it;
        B zero. `generator` (CPU) makes the draw the same in every layout."""
        rank, size = self._tp()
        for name in self.adapter_names():
            param = getattr(self, name)
            if not name.startswith(PREFIX + "a"):
                param.zero_()
                continue
            axis = self._adapter_axes.get(name)
            full = list(param.shape)
            if axis is not None:
                full[axis] *= size
            values = (torch.rand(full, generator=generator, dtype=torch.float64) * 2 - 1) / full[1] ** 0.5
            param.copy_(values if axis is None else values.chunk(size, axis)[rank])

    @torch.no_grad()
    def merge_adapters(self) -> None:
        """weight += (alpha / r) * delta (computed in fp32, stored in the weight's dtype); the adapters
        are then removed and the module is megatron's plain linear."""
        delta = self._delta_weight()
        self.weight.copy_((self.weight.float() + self.lora.scaling * delta).to(self.weight.dtype))
        for name in self.adapter_names():
            delattr(self, name)
        self.lora = None

    def _sharded_state_dict(self, prefix, sharded_offsets, metadata, base_axes: Dict[str, int]):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, {**base_axes, **self._adapter_axes},
                                                   sharded_offsets, tp_group=self.tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])


class LoRAQKVLinear(_Adapters, ColumnParallelLinear):
    """megatron's fused QKV ColumnParallelLinear [(Nq + 2G) d / TP, H] plus per-projection adapters:
    lora_a_q, lora_a_k, lora_a_v [r, H] (replicated), lora_b_q [Nq d / TP, r], lora_b_k, lora_b_v
    [G d / TP, r] (split by heads). Built by megatron's SelfAttention through the layer spec."""

    def __init__(self, input_size: int, output_size: int, *, config, lora: LoRASettings, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        _, tp = self._tp()
        if config.num_query_groups % tp or config.sequence_parallel:
            raise ValueError("LoRA on linear_qkv needs whole query groups per TP rank and no sequence parallelism")
        self.lora, self._adapter_axes = lora, {}
        self.groups = config.num_query_groups // tp
        d, r = config.kv_channels, lora.rank
        for proj, rows in (("q", config.num_attention_heads // tp * d), ("k", self.groups * d), ("v", self.groups * d)):
            self._add_adapter(f"lora_a_{proj}", (r, input_size), None)
            self._add_adapter(f"lora_b_{proj}", (rows, r), 0)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        """x [S, B, H] -> ([S, B, (Nq + 2G) d / TP], bias), the adapters' update added."""
        out, bias = super().forward(x, *args, **kwargs)
        if self.lora is None:
            return out, bias
        h = x.shape[-1]
        a = torch.cat([F.linear(self._dropout(x, h), getattr(self, f"lora_a_{p}")) for p in "qkv"], dim=-1)
        a = copy_to_tensor_model_parallel_region(a, group=self.tp_group)  # [S, B, 3r]; backward: sum over TP
        q, k, v = (F.linear(part, getattr(self, f"lora_b_{p}")) for part, p in zip(a.chunk(3, dim=-1), "qkv"))
        return out + self.lora.scaling * per_group_concat(q, k, v, self.groups), bias

    def _delta_weight(self) -> torch.Tensor:
        """B A of q, k, v in the fused layout: [(Nq + 2G) d / TP, H] fp32."""
        q, k, v = (getattr(self, f"lora_b_{p}").float() @ getattr(self, f"lora_a_{p}").float() for p in "qkv")
        return per_group_concat(q.t(), k.t(), v.t(), self.groups).t()

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self._sharded_state_dict(prefix, sharded_offsets, metadata, {"weight": 0, "bias": 0})


class LoRAProjLinear(_Adapters, RowParallelLinear):
    """megatron's attention output RowParallelLinear [H, Nq d / TP] plus an adapter: lora_a
    [r, Nq d / TP] (split by heads, as the input), lora_b [H, r] (replicated)."""

    def __init__(self, input_size: int, output_size: int, *, config, lora: LoRASettings, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        if config.sequence_parallel:
            raise ValueError("LoRA on linear_proj does not support sequence parallelism")
        self.lora, self._adapter_axes = lora, {}
        self._add_adapter("lora_a", (lora.rank, self.input_size_per_partition), 1)
        self._add_adapter("lora_b", (output_size, lora.rank), None)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        """x [S, B, Nq d / TP] -> ([S, B, H] summed over TP, bias), the adapter's update added."""
        out, bias = super().forward(x, *args, **kwargs)
        if self.lora is None:
            return out, bias
        a = F.linear(self._dropout(x, self.input_size), self.lora_a)  # this rank's part of A x: [S, B, r]
        a = reduce_from_tensor_model_parallel_region(a, group=self.tp_group)
        return out + self.lora.scaling * F.linear(a, self.lora_b), bias

    def _delta_weight(self) -> torch.Tensor:
        return self.lora_b.float() @ self.lora_a.float()  # [H, Nq d / TP]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self._sharded_state_dict(prefix, sharded_offsets, metadata, {"weight": 1})


def adapted_linears(llm) -> Iterator[Tuple[int, _Adapters]]:
    """(global layer index, adapted linear) for this stage's layers, qkv before proj, while adapted."""
    for layer in llm.decoder.layers:
        attention = layer.self_attention
        for module in (attention.linear_qkv, attention.linear_proj):
            if isinstance(module, _Adapters) and module.lora is not None:
                yield layer.layer_number - 1, module


def init_adapters(llm, seed: int) -> None:
    """Every adapter of this stage's LLM initialised from `seed` and its global layer: the same values
    whatever the TP x PP layout (A kaiming-uniform, B zero)."""
    for layer, module in adapted_linears(llm):
        which = 0 if isinstance(module, LoRAQKVLinear) else 1
        module.reset_adapters(torch.Generator().manual_seed(seed * 1_000_003 + 2 * layer + which))


def merge_adapters(emu_model) -> int:
    """Fold every adapter of this EmuModel stage into its base weight (removing it, so the model is a
    plain one); returns how many linears were adapted."""
    modules = [module for _, module in adapted_linears(emu_model.llm)]
    for module in modules:
        module.merge_adapters()
    emu_model.lora = None
    return len(modules)


def has_adapters(model: torch.nn.Module) -> bool:
    return any(is_adapter(name) for name, _ in model.named_parameters())


def freeze_all_but_adapters(model: torch.nn.Module) -> None:
    """requires_grad only on adapter parameters: the base stays bit-identical and out of the optimizer."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))


def load_state_part(model: torch.nn.Module, state: Dict[str, torch.Tensor], adapters: bool) -> None:
    """Load `state` (model state-dict names) into `model`: every adapter tensor and nothing else
    (`adapters`), or every base tensor and nothing else (the adapters stay as they are). ValueError
    naming what is missing or unexpected."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if is_adapter(name) == adapters]
    if missing or unexpected:
        raise ValueError(f"{'adapter' if adapters else 'base'} state: missing {missing[:3]}, "
                         f"unexpected {list(unexpected)[:3]}")
