"""The LLM's core attention as a megatron-core module: the fused packed-document backends of
emu_mc/model/document_attention.py behind megatron's layer spec.

`llm_layer_spec(impl)` is megatron's local GPT layer spec with `core_attention` swapped for
`DocumentAttention` (impl "local" keeps the stock spec and its dense mask). The swap adds no
parameter and renames none: checkpoints load across backends. Megatron's attention hands the core
attention q [S, B, Hq/tp, D] and k, v [S, B, Hkv/tp, D] after RoPE (this rank's heads under tensor
parallelism), and the micro-batch's `PackedDocuments` as `packed_seq_params` (built once per
micro-batch by emu_mc/model/llm.py: `llm_attention_inputs`, passed to every layer, kept through
activation recompute).
"""
import functools
import math
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from emu_mc.model.document_attention import (FUSED_IMPLS, PackedDocuments, document_attention, from_thd,
                                             to_thd)


class DocumentAttention(MegatronModule):
    """Core attention, causal inside each packed document; no parameters. Built by megatron's
    SelfAttention with the arguments it gives every core attention, plus `impl` (from the spec)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, *, impl: str):
        super().__init__(config=config)
        if impl not in FUSED_IMPLS:
            raise ValueError(f"DocumentAttention: impl {impl!r} is not one of {list(FUSED_IMPLS)}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        unsupported = {"attention_dropout > 0": dropout > 0,
                       "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
                       "window attention": config.window_size is not None,
                       "softmax_type other than vanilla": config.softmax_type != "vanilla",
                       "context parallelism": config.context_parallel_size > 1}
        for what, present in unsupported.items():
            if present:
                raise ValueError(f"model.llm.attention_impl {impl}: {what} is not supported; use local")
        self.impl = impl
        head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        # TE's module carries fp8 `_extra_state`; kept out of the module tree (and the checkpoint)
        # so that every backend saves and loads the same names.
        self._te = (_te_attention(config, layer_number, attention_type, self.softmax_scale, pg_collection),) \
            if impl == "te" else ()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedDocuments] = None) -> torch.Tensor:
        """query [S, B, Hq, D], key/value [S, B, Hkv, D] -> context [S, B, Hq * D]."""
        if not isinstance(packed_seq_params, PackedDocuments):
            raise ValueError(f"attention_impl {self.impl} needs the micro-batch's PackedDocuments as packed_seq_params "
                             "(emu_mc.model.llm.llm_attention_inputs builds them)")
        if attention_bias is not None:
            raise ValueError(f"attention_impl {self.impl}: attention_bias is not supported")
        if self.impl == "te":
            return self._te_forward(query, key, value, packed_seq_params)
        return document_attention(query, key, value, packed_seq_params, self.impl, self.softmax_scale)

    def _te_forward(self, query, key, value, docs: PackedDocuments) -> torch.Tensor:
        s, b = query.shape[:2]
        thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=docs.cu_seqlens, cu_seqlens_kv=docs.cu_seqlens,
                              max_seqlen_q=docs.max_seqlen, max_seqlen_kv=docs.max_seqlen)
        out = self._te[0](to_thd(query), to_thd(key), to_thd(value), None,
                          attn_mask_type=AttnMaskType.padding_causal, packed_seq_params=thd)
        return from_thd(out, s, b)


def _te_attention(config, layer_number, attention_type, softmax_scale, pg_collection):
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return TEDotProductAttention(config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.padding_causal,
                                 attention_type=attention_type, softmax_scale=softmax_scale,
                                 pg_collection=pg_collection)


def llm_layer_spec(impl: str, lora=None):
    """Megatron's local GPT layer spec (RMSNorm, SwiGLU, no biases) with the core attention of `impl`
    (a resolved backend: local, sdpa, flex, flash_varlen, te); with `lora` (LoRASettings), its
    linear_qkv and linear_proj carry LoRA adapters (emu_mc/model/lora.py)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = spec.submodules.self_attention.submodules
    if impl != "local":
        attention.core_attention = functools.partial(DocumentAttention, impl=impl)
    if lora is not None:
        from emu_mc.model.lora import LoRAProjLinear, LoRAQKVLinear

        attention.linear_qkv = functools.partial(LoRAQKVLinear, lora=lora)  # SelfAttention calls it
        attention.linear_proj = ModuleSpec(module=LoRAProjLinear, params={"lora": lora})  # build_module builds it
    return spec

