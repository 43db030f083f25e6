"""The multimodal LLM (docs/model.md, component 4): a LLaMA-style megatron-core GPTModel.

`build_llm` makes the GPTModel (megatron's local layer spec: RMSNorm, SwiGLU, RoPE, no biases; its core
attention chosen by `model.llm.attention_impl`, emu_mc/model/llm_attention.py) for this rank's
tensor/pipeline shard. `llm_hidden_states` runs it from input embeddings (first stage) or from the
pipeline's input tensor (later stages) to the final hidden states, without the output layer: the
mixed loss applies the output layer itself, blockwise. Attention is causal within each packed document
(segment ids); position ids restart per document.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

from emu_mc.config import LLMConfig
from emu_mc.parallel import cpu_compat


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Round up to a multiple of lcm(divisible_by, tp), so the vocab splits evenly over `tp` ranks.

    Unlike megatron's divisible_by * tp, the result does not change with tp whenever tp divides
    divisible_by (e.g. 128 and tp in 1..128 powers of two), so checkpoints reshard across TP."""
    multiple = math.lcm(divisible_by, tp)
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_config(cfg: LLMConfig, *, init_std: float, params_dtype=torch.float32,
                       recompute: bool = False, tp: int = 1, pp: int = 1):
    from megatron.core.transformer import TransformerConfig

    extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        **extra,
        **cpu_compat.megatron_cpu_config_overrides(),
    )


def build_llm(cfg: LLMConfig, vocab_size: int, *, init_std: float = 0.02, pre_process: bool = True,
              post_process: bool = True, params_dtype=torch.float32, recompute: bool = False,
              tp: int = 1, pp: int = 1, config=None, lora=None):
    """GPTModel for this rank. `vocab_size` is the padded size (see padded_vocab_size).

    Tensor parallel (tp > 1): vocab-parallel embedding and output layer, column-parallel QKV and
    fc1, row-parallel proj and fc2 (megatron-core). Pipeline parallel (pp > 1): this stage builds
    num_layers / pp layers; the embedding only when pre_process, final norm and output layer only
    when post_process. `config` (a TransformerConfig) overrides the one built from `cfg`. The model's
    `attention_impl` attribute names the attention backend that runs (cfg.attention_impl resolved).
    `lora` (LoRASettings, emu_mc/model/lora.py): the attention's q, k, v and o projections carry adapters.
    """
    from megatron.core.models.gpt import GPTModel

    from emu_mc.model.document_attention import resolve_attention_impl
    from emu_mc.model.llm_attention import llm_layer_spec

    if config is None:
        config = transformer_config(cfg, init_std=init_std, params_dtype=params_dtype, recompute=recompute,
                                    tp=tp, pp=pp)
    impl = resolve_attention_impl(cfg.attention_impl)
    llm = GPTModel(
        config=config,
        transformer_layer_spec=llm_layer_spec(impl, lora),
        vocab_size=vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
    )
    llm.attention_impl = impl
    return llm


def document_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [B, S] -> megatron attention mask [B, 1, S, S] bool, True = masked:
    causal, and only within the same document (padding, segment -1, attends only to padding)."""
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ~(causal & same_doc)[:, None]


def llm_attention_inputs(impl: str, segment_ids: torch.Tensor) -> dict:
    """The micro-batch's attention inputs for megatron's TransformerBlock, built once and used by every
    layer: the dense mask for `local`, PackedDocuments (as packed_seq_params) for the fused backends."""
    from emu_mc.model.document_attention import PackedDocuments

    if impl == "local":
        return {"attention_mask": document_causal_mask(segment_ids), "packed_seq_params": None}
    return {"attention_mask": None, "packed_seq_params": PackedDocuments.from_segment_ids(segment_ids, impl)}


def rotary_for_positions(llm, position_ids: torch.Tensor) -> torch.Tensor:
    """Per-token RoPE angles [S, B, 1, rot_dim] for position_ids [B, S] (positions restart per document)."""
    table = llm.rotary_pos_emb(int(position_ids.max()) + 1)  # [P, 1, 1, rot_dim]
    return table[:, 0, 0, :][position_ids.t()].unsqueeze(2)


def llm_hidden_states(llm, decoder_input: Optional[torch.Tensor], position_ids: torch.Tensor,
                      segment_ids: torch.Tensor) -> torch.Tensor:
    """decoder_input [S, B, H] (None on later pipeline stages: the schedule set the input tensor),
    position_ids / segment_ids [B, S] long -> hidden [S, B, H]; after the final RMSNorm on the last stage."""
    return llm.decoder(
        hidden_states=decoder_input,
        rotary_pos_emb=rotary_for_positions(llm, position_ids),
        **llm_attention_inputs(llm.attention_impl, segment_ids),
    )


def output_weight(llm) -> torch.Tensor:
    """This rank's output-layer (vocab shard) weight [V_local, H]; the embedding when tied."""
    if llm.share_embeddings_and_output_weights:
        return llm.shared_embedding_or_output_weight()
    return llm.output_layer.weight
