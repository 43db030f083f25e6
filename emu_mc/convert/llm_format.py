"""Our LLM checkpoint format: a directory with

    llm.safetensors   the full (TP=1, PP=1) state dict of our GPTModel, megatron-core parameter names,
                      vocab rows = the checkpoint's true vocab_size (no padding rows)
    emu_mc_llm.json   {"format": "emu_mc.llm/1", "vocab_size": V, "dtype": "...", "llm": {LLMConfig fields}}

Parameter names and shapes (Nq heads, G query groups, d = hidden / Nq, F = ffn, L layers):
    embedding.word_embeddings.weight                  [V, H]
    decoder.layers.{i}.input_layernorm.weight         [H]
    decoder.layers.{i}.self_attention.linear_qkv.weight  [(Nq + 2G) d, H]  per group: [q heads..., k, v]
    decoder.layers.{i}.self_attention.linear_proj.weight [H, Nq d]
    decoder.layers.{i}.pre_mlp_layernorm.weight       [H]
    decoder.layers.{i}.mlp.linear_fc1.weight          [2F, H]  [gate; up]
    decoder.layers.{i}.mlp.linear_fc2.weight          [H, F]
    decoder.final_layernorm.weight                    [H]
    output_layer.weight                               [V, H]  (absent when tie_word_embeddings)
"""
import dataclasses
import json
import os
from typing import Dict, List, Tuple

import torch

from emu_mc.config import LLMConfig
from emu_mc.convert.errors import ConversionError, check_keys, check_shape
from emu_mc.convert.tensor_files import StateDict, read_tensor_file, write_safetensors

FORMAT = "emu_mc.llm/1"
WEIGHTS_FILE, META_FILE = "llm.safetensors", "emu_mc_llm.json"
EMBEDDING, FINAL_NORM, OUTPUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"
LAYER_PREFIX = "decoder.layers.{}."
INPUT_NORM, QKV, PROJ = "input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight"
MLP_NORM, FC1, FC2 = "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"
LAYER_TENSORS = (INPUT_NORM, QKV, PROJ, MLP_NORM, FC1, FC2)
# LLMConfig fields that define the weights and the forward pass (written to and checked from the json).
ARCH_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings")


def query_groups(cfg: LLMConfig) -> int:
    """Key/value heads: num_query_groups, or num_attention_heads when None (multi-head attention)."""
    return cfg.num_query_groups or cfg.num_attention_heads


def llm_shapes(cfg: LLMConfig, vocab_size: int) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor of the full state dict (vocab rows = vocab_size)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    d = h // cfg.num_attention_heads
    layer = {INPUT_NORM: (h,), QKV: ((cfg.num_attention_heads + 2 * query_groups(cfg)) * d, h),
             PROJ: (h, cfg.num_attention_heads * d), MLP_NORM: (h,), FC1: (2 * f, h), FC2: (h, f)}
    shapes = {EMBEDDING: (vocab_size, h), FINAL_NORM: (h,)}
    if not cfg.tie_word_embeddings:
        shapes[OUTPUT] = (vocab_size, h)
    for i in range(cfg.num_layers):
        shapes.update({LAYER_PREFIX.format(i) + k: v for k, v in layer.items()})
    return shapes


def check_llm_state(state: StateDict, cfg: LLMConfig, vocab_size: int, what: str) -> None:
    """ConversionError naming the first missing/unexpected/mis-shaped tensor of `state`."""
    shapes = llm_shapes(cfg, vocab_size)
    check_keys(list(shapes), list(state), what)
    for name, shape in shapes.items():
        check_shape(name, shape, state[name].shape, f" in {what}")


def full_names(num_layers: int, tied: bool) -> List[str]:
    """Every tensor name of the full state dict of a `num_layers` model."""
    layers = [LAYER_PREFIX.format(i) + t for i in range(num_layers) for t in LAYER_TENSORS]
    return [EMBEDDING, *layers, FINAL_NORM] + ([] if tied else [OUTPUT])


def arch_mismatches(a: LLMConfig, b: LLMConfig) -> List[str]:
    """'field: a vs b' for every architecture field where the two configs disagree
    (max_position_embeddings aside: RoPE has no per-position weights)."""
    def value(cfg, name):
        return query_groups(cfg) if name == "num_query_groups" else getattr(cfg, name)
    return [f"{n}: {value(a, n)} vs {value(b, n)}" for n in ARCH_FIELDS
            if n != "max_position_embeddings" and value(a, n) != value(b, n)]


def write_llm_checkpoint(directory: str, state: StateDict, cfg: LLMConfig, vocab_size: int) -> None:
    """Validate `state` against `cfg` and write the two files into `directory`."""
    check_llm_state(state, cfg, vocab_size, "LLM state")
    write_safetensors(os.path.join(directory, WEIGHTS_FILE), state)
    meta = {"format": FORMAT, "vocab_size": vocab_size, "dtype": str(state[EMBEDDING].dtype).removeprefix("torch."),
            "llm": {n: getattr(cfg, n) for n in ARCH_FIELDS}}
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def read_llm_meta(directory: str) -> Tuple[LLMConfig, int]:
    """emu_mc_llm.json -> (LLMConfig with the architecture fields set, vocab_size)."""
    path = os.path.join(directory, META_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ConversionError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        fields = {n: meta["llm"][n] for n in ARCH_FIELDS}
        return dataclasses.replace(LLMConfig(), **fields), int(meta["vocab_size"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        hint = ("; a pretraining run's checkpoint? python -m emu_mc.convert export --checkpoint DIR --to emu|hf"
                if os.path.exists(os.path.join(directory, "meta.json")) or os.path.isdir(os.path.join(directory, "checkpoints")) else "")
        raise ConversionError(f"{path}: missing or invalid ({type(e).__name__}: {e}){hint}") from None


def read_llm_checkpoint(directory: str) -> Tuple[StateDict, LLMConfig, int]:
    """A checkpoint directory -> (full state dict, LLMConfig, vocab_size), validated."""
    cfg, vocab_size = read_llm_meta(directory)
    path = os.path.join(directory, WEIGHTS_FILE)
    state = read_tensor_file(path)
    check_llm_state(state, cfg, vocab_size, path)
    return state, cfg, vocab_size


def add_vocab_rows(state: StateDict, vocab_size: int) -> StateDict:
    """`state` (full LLM state dict) with its embedding and output layer grown to `vocab_size` rows, each
    new row the mean of the existing rows (computed in fp32), as the release initialises its added
    special tokens (modeling_llama.py smart_tokenizer_and_embedding_resize). [V, H] -> [vocab_size, H]."""
    grown = dict(state)
    for name in (EMBEDDING, OUTPUT):
        rows = state.get(name)
        if rows is not None and rows.shape[0] < vocab_size:
            mean = rows.float().mean(dim=0, keepdim=True).to(rows.dtype)
            grown[name] = torch.cat([rows, mean.expand(vocab_size - rows.shape[0], -1)])
    return grown
