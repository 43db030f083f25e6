"""Incremental LLM forward with a key/value cache, for generation (PP = 1; any TP: the cache holds this
rank's key/value heads, megatron's parallel linears do the communication).

The training forward (`emu_mc.model.llm.llm_hidden_states`) recomputes every position. Here each
megatron TransformerLayer is run piece by piece with its own modules (norms, fused QKV projection,
output projection, MLP), so the weights and the QKV layout are megatron's; only the core attention is
ours: RoPE at each row's own positions, the new keys/values written into the cache, and
scaled-dot-product attention of the new queries over the cached keys under a mask that is causal and
hides left padding. tests/inference check it against the training forward.

Shapes: B rows, S new positions, T cached positions, G key/value groups, D head dim, H LLM width.
Rows are left-padded: `valid` [B, T] is False on padding; a padding query attends to itself only
(as `document_causal_mask` does), so no softmax row is empty.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F

from emu_mc.model.llm import rotary_for_positions


class KVCache:
    """Keys and values of every layer, [B, G, capacity, D] each, filled up to `length`; `valid` [B, capacity]
    bool marks real (non-padding) positions; `count` [B] long the real positions of each row so far."""

    def __init__(self, num_layers: int, batch: int, groups: int, head_dim: int, capacity: int, dtype, device):
        shape = (batch, groups, capacity, head_dim)
        self.keys: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def advance(self, valid_new: torch.Tensor) -> tuple:
        """Reserve S positions for `valid_new` [B, S] bool. Returns (position_ids [B, S] long, the
        attention mask [B, 1, S, length + S] bool, True = attend)."""
        s = valid_new.shape[1]
        if self.length + s > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {s} positions exceed its capacity {self.capacity}")
        start, end = self.length, self.length + s
        self.valid[:, start:end] = valid_new
        positions = (self.count[:, None] + valid_new.long().cumsum(1) - 1).clamp(min=0)
        self.count += valid_new.long().sum(1)
        self.length = end
        key_pos = torch.arange(end, device=valid_new.device)
        query_pos = torch.arange(start, end, device=valid_new.device)
        causal = key_pos[None, :] <= query_pos[:, None]  # [S, end]
        mask = causal[None] & self.valid[:, None, :end]  # [B, S, end]
        mask |= key_pos[None, None, :] == query_pos[None, :, None]  # padding attends to itself
        return positions, mask[:, None]

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple:
        """Store key/value [S, B, G, D] (RoPE applied) at the newest S positions; return the layer's
        keys and values so far, [B, G, length, D] each."""
        s = key.shape[0]
        self.keys[layer][:, :, self.length - s:self.length] = key.permute(1, 2, 0, 3)
        self.values[layer][:, :, self.length - s:self.length] = value.permute(1, 2, 0, 3)
        return self.keys[layer][:, :, :self.length], self.values[layer][:, :, :self.length]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` [B'] (beam search: reorder or expand the rows)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.valid = self.valid.index_select(0, index)
        self.count = self.count.index_select(0, index)


def new_cache(llm, batch: int, capacity: int, dtype=None, device=None) -> KVCache:
    """An empty KVCache for `llm` (a megatron GPTModel with all its layers on this rank)."""
    cfg = llm.config
    attn = llm.decoder.layers[0].self_attention
    weight = attn.linear_qkv.weight
    return KVCache(len(llm.decoder.layers), batch, attn.num_query_groups_per_partition, cfg.kv_channels, capacity,
                   dtype or weight.dtype, device or weight.device)


def _attention(attn, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor, cache: KVCache, layer: int):
    """One SelfAttention on new positions x [S, B, H] -> [S, B, H] (output projection applied)."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    query, key, value = attn.get_query_key_value_tensors(x)  # [S, B, heads or G, D]
    query = apply_rotary_pos_emb(query, rope, config=attn.config)
    key = apply_rotary_pos_emb(key, rope, config=attn.config)
    keys, values = cache.write(layer, key, value)
    scale = attn.config.softmax_scale or attn.config.kv_channels ** -0.5
    context = F.scaled_dot_product_attention(query.permute(1, 2, 0, 3), keys, values, attn_mask=mask, scale=scale,
                                             enable_gqa=query.shape[2] != keys.shape[1])  # [B, heads, S, D]
    s, b = x.shape[:2]
    out, _ = attn.linear_proj(context.permute(2, 0, 1, 3).reshape(s, b, -1))
    return out


@torch.no_grad()
def cached_hidden_states(llm, decoder_input: torch.Tensor, valid_new: torch.Tensor, cache: KVCache,
                         final_norm: bool = True) -> torch.Tensor:
    """decoder_input [S, B, H] (input embeddings of the next S positions), valid_new [B, S] bool
    -> hidden [S, B, H], after the final RMSNorm when `final_norm`; the cache grows by S positions."""
    positions, mask = cache.advance(valid_new)
    rope = rotary_for_positions(llm, positions)
    x = decoder_input
    for i, layer in enumerate(llm.decoder.layers):
        x = x + _attention(layer.self_attention, layer.input_layernorm(x), rope, mask, cache, i)
        out, _ = layer.mlp(layer.pre_mlp_layernorm(x))
        x = x + out
    return llm.decoder.final_layernorm(x) if final_norm else x


LENGTH_STEP = 128  # FlexAttention's block size


def recomputed_hidden_states(llm, decoder_input: torch.Tensor, valid: torch.Tensor,
                             position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The training forward over a whole left-padded sequence: decoder_input [S, B, H], valid [B, S]
    bool -> final-norm hidden [S, B, H]. What generation without a cache runs at every step.
    A batch with padding runs right-padded to a multiple of LENGTH_STEP positions (cut off again; no
    real position sees them): compiled FlexAttention, which builds one kernel per sequence length,
    then compiles once per 128 positions, not once per generated token or per batch's prompt length.
    A batch without padding runs at its length (plain causal attention, nothing compiled per length)."""
    from emu_mc.model.llm import llm_hidden_states

    if position_ids is None:
        position_ids = (valid.long().cumsum(1) - 1).clamp(min=0)
    s, b, _ = decoder_input.shape
    extra = 0 if bool(valid.all()) else -s % LENGTH_STEP
    if extra:
        decoder_input = torch.cat([decoder_input, decoder_input.new_zeros(extra, *decoder_input.shape[1:])])
        valid = torch.cat([valid, valid.new_zeros(b, extra)], 1)
        position_ids = torch.cat([position_ids, position_ids.new_zeros(b, extra)], 1)
    return llm_hidden_states(llm, decoder_input, position_ids, torch.where(valid, 0, -1))[:s]
