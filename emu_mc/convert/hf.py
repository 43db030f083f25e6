"""HF LLaMA-family checkpoints (LlamaForCausalLM: LLaMA-1/2/3, GQA, any rope_theta, tied or untied
embeddings) <-> our LLM checkpoint format (llm_format.py).

Both use the same RoPE convention (rotate_half over [first half | second half] of each head, which is
megatron-core's default non-interleaved rotary), so q/k rows are copied as they are; only the fused
tensors are re-laid out:
    linear_qkv = per query group g: [q heads of g (Nq/G of them); k head g; v head g]
    linear_fc1 = [gate_proj; up_proj]
Unsupported (ConversionError): biases (attention_bias/mlp_bias), rope scaling (e.g. LLaMA-3.1's
"llama3" rope type), head_dim != hidden/heads, activations other than silu.
"""
import json
import os
from typing import Dict, Tuple

import torch

from emu_mc.config import LLMConfig
from emu_mc.convert.errors import ConversionError, check_keys, check_shape
from emu_mc.convert.llm_format import (EMBEDDING, FC1, FC2, FINAL_NORM, INPUT_NORM, LAYER_PREFIX, MLP_NORM,
                                       OUTPUT, PROJ, QKV, query_groups, read_llm_checkpoint,
                                       write_llm_checkpoint)
from emu_mc.convert.tensor_files import StateDict, read_hf_weights, write_safetensors

HF_LAYER_PREFIX = "model.layers.{}."
# Tensors that are renamed only: ours -> HF.
RENAMED = {EMBEDDING: "model.embed_tokens.weight", FINAL_NORM: "model.norm.weight", OUTPUT: "lm_head.weight"}
RENAMED_IN_LAYER = {INPUT_NORM: "input_layernorm.weight", PROJ: "self_attn.o_proj.weight",
                    MLP_NORM: "post_attention_layernorm.weight", FC2: "mlp.down_proj.weight"}
Q, K, V = "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"
GATE, UP = "mlp.gate_proj.weight", "mlp.up_proj.weight"


# --------------------------------------------------------------------------- config


def _rope_type(rope: Dict) -> str:
    return rope.get("rope_type") or rope.get("type") or "default"


def _rope_theta(hf: Dict) -> float:
    """rope_theta from a transformers 4.x (rope_theta + rope_scaling) or 5.x (rope_parameters) config;
    a config holding both rope_parameters and rope_scaling must have them agree."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if params and scaling and (_rope_type(params) != _rope_type(scaling) or any(
            params.get(k) != v for k, v in scaling.items() if k not in ("type", "rope_type"))):
        raise ConversionError(f"config.json: rope_parameters {params} and rope_scaling {scaling} disagree; "
                              "keep the one the model was trained with")
    rope_type = _rope_type(params) if params else _rope_type(scaling)
    if rope_type != "default":
        raise ConversionError(f"config.json rope type {rope_type!r}: only plain RoPE ('default') is supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if "rope_theta" in params and "rope_theta" in hf and float(params["rope_theta"]) != float(hf["rope_theta"]):
        raise ConversionError(f"config.json: rope_parameters.rope_theta {params['rope_theta']} and rope_theta "
                              f"{hf['rope_theta']} disagree")
    return float(theta)


def llm_config_from_hf(hf: Dict) -> Tuple[LLMConfig, int]:
    """An HF LLaMA config.json (as a dict) -> (our LLMConfig, vocab_size)."""
    def unsupported(field, allowed):
        if hf.get(field) not in (None, allowed):
            raise ConversionError(f"config.json {field}={hf[field]!r}: only {allowed!r} is supported")
    unsupported("model_type", "llama")
    unsupported("hidden_act", "silu")
    unsupported("attention_bias", False)
    unsupported("mlp_bias", False)
    try:
        heads = hf["num_attention_heads"]
        unsupported("head_dim", hf["hidden_size"] // heads)
        cfg = LLMConfig(
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads, ffn_hidden_size=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
        return cfg, hf["vocab_size"]
    except KeyError as e:
        raise ConversionError(f"config.json: missing field {e.args[0]!r}") from None


def hf_config_from_llm(cfg: LLMConfig, vocab_size: int, dtype: torch.dtype):
    """Our LLMConfig -> transformers.LlamaConfig (architectures = LlamaForCausalLM)."""
    from transformers import LlamaConfig

    hf = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=query_groups(cfg), rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        dtype=str(dtype).removeprefix("torch."),
    )
    hf.architectures = ["LlamaForCausalLM"]
    return hf


# --------------------------------------------------------------------------- tensors


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """q [Nq d, H], k/v [G d, H] -> megatron linear_qkv [(Nq + 2G) d, H], per group [q...; k; v]."""
    h = q.shape[1]
    return torch.cat([t.reshape(groups, -1, h) for t in (q, k, v)], dim=1).reshape(-1, h)


def split_qkv(qkv: torch.Tensor, groups: int, head_dim: int) -> Tuple[torch.Tensor, ...]:
    """Inverse of fuse_qkv: [(Nq + 2G) d, H] -> q [Nq d, H], k [G d, H], v [G d, H]."""
    h = qkv.shape[1]
    per_group = qkv.reshape(groups, -1, h)
    q, k, v = per_group.split([per_group.shape[1] - 2 * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, h) for t in (q, k, v))


def hf_shapes(cfg: LLMConfig, vocab_size: int) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor an HF LlamaForCausalLM checkpoint must hold."""
    h, f, g = cfg.hidden_size, cfg.ffn_hidden_size, query_groups(cfg)
    d = h // cfg.num_attention_heads
    layer = {"input_layernorm.weight": (h,), Q: (cfg.num_attention_heads * d, h), K: (g * d, h), V: (g * d, h),
             "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d), "post_attention_layernorm.weight": (h,),
             GATE: (f, h), UP: (f, h), "mlp.down_proj.weight": (h, f)}
    shapes = {"model.embed_tokens.weight": (vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab_size, h)
    for i in range(cfg.num_layers):
        shapes.update({HF_LAYER_PREFIX.format(i) + k: v for k, v in layer.items()})
    return shapes


def _check_hf_state(hf: StateDict, cfg: LLMConfig, vocab_size: int, what: str) -> StateDict:
    """Validated copy of `hf` without the tensors we derive or ignore (rotary inv_freq buffers, and a
    tied lm_head that equals the embedding)."""
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings and "lm_head.weight" in hf:
        if not torch.equal(hf.pop("lm_head.weight"), hf.get("model.embed_tokens.weight")):
            raise ConversionError(f"{what}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
    shapes = hf_shapes(cfg, vocab_size)
    check_keys(list(shapes), list(hf), what)
    for name, shape in shapes.items():
        check_shape(name, shape, hf[name].shape, f" in {what}")
    return hf


def hf_to_emu_state(hf: StateDict, cfg: LLMConfig, vocab_size: int) -> StateDict:
    """HF LlamaForCausalLM tensors -> our full state dict (see llm_format.py). Tensors keep their dtype."""
    hf = _check_hf_state(hf, cfg, vocab_size, "HF checkpoint")
    ours = {name: hf[hf_name] for name, hf_name in RENAMED.items() if hf_name in hf}
    for i in range(cfg.num_layers):
        src, dst = HF_LAYER_PREFIX.format(i), LAYER_PREFIX.format(i)
        ours.update({dst + name: hf[src + hf_name] for name, hf_name in RENAMED_IN_LAYER.items()})
        ours[dst + QKV] = fuse_qkv(hf[src + Q], hf[src + K], hf[src + V], query_groups(cfg))
        ours[dst + FC1] = torch.cat([hf[src + GATE], hf[src + UP]], dim=0)
    return ours


def emu_to_hf_state(ours: StateDict, cfg: LLMConfig) -> StateDict:
    """Our full state dict -> HF LlamaForCausalLM tensors (lm_head omitted when tied)."""
    hf = {hf_name: ours[name] for name, hf_name in RENAMED.items() if name in ours}
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_layers):
        src, dst = LAYER_PREFIX.format(i), HF_LAYER_PREFIX.format(i)
        hf.update({dst + hf_name: ours[src + name] for name, hf_name in RENAMED_IN_LAYER.items()})
        q, k, v = split_qkv(ours[src + QKV], query_groups(cfg), head_dim)
        hf.update({dst + Q: q, dst + K: k, dst + V: v})
        hf[dst + GATE], hf[dst + UP] = ours[src + FC1].chunk(2, dim=0)
    return hf


# --------------------------------------------------------------------------- directories


def read_hf_config(directory: str) -> Dict:
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: missing or invalid ({type(e).__name__}: {e})") from None


def hf_to_emu(hf_dir: str, out_dir: str) -> Tuple[LLMConfig, int]:
    """Convert an HF checkpoint directory into our format in `out_dir`; returns (LLMConfig, vocab_size)."""
    cfg, vocab_size = llm_config_from_hf(read_hf_config(hf_dir))
    state = hf_to_emu_state(read_hf_weights(hf_dir), cfg, vocab_size)
    write_llm_checkpoint(out_dir, state, cfg, vocab_size)
    return cfg, vocab_size


def write_hf_llm(out_dir: str, state: StateDict, cfg: LLMConfig, vocab_size: int) -> None:
    """Our full LLM state dict -> config.json + model.safetensors (LlamaForCausalLM) in `out_dir`."""
    hf_config_from_llm(cfg, vocab_size, state[EMBEDDING].dtype).save_pretrained(out_dir)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), emu_to_hf_state(state, cfg))


def emu_to_hf(emu_dir: str, out_dir: str) -> Tuple[LLMConfig, int]:
    """Convert our checkpoint directory into config.json + model.safetensors (LlamaForCausalLM)."""
    state, cfg, vocab_size = read_llm_checkpoint(emu_dir)
    write_hf_llm(out_dir, state, cfg, vocab_size)
    return cfg, vocab_size
