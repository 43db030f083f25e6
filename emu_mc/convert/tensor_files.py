"""Reading and writing tensor files (safetensors, torch pickles) with failures as ConversionError."""
import glob
import json
import os
import pickle
from typing import Dict, List

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from emu_mc.convert.errors import ConversionError

StateDict = Dict[str, torch.Tensor]


def read_tensor_file(path: str) -> StateDict:
    """One .safetensors file or torch pickle (.bin/.pt/.pth, loaded weights_only) -> {name: tensor} on CPU.

    A pickle holding {"model"|"state_dict"|"module": {...}} is unwrapped one level; a DeepSpeed
    checkpoint's "module" also when other entries (step counters, ...) lie beside it."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise ConversionError(f"{path}: unreadable or damaged tensor file ({type(e).__name__}: {e})") from None
    for wrapper in ("model", "state_dict", "module"):
        beside_others = wrapper == "module" and isinstance(state, dict) and isinstance(state.get(wrapper), dict)
        if isinstance(state, dict) and (set(state) == {wrapper} or beside_others):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected a mapping of names to tensors")
    return state


def write_safetensors(path: str, state: StateDict) -> None:
    """Write contiguous copies of `state` to `path` (parent directories created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})


def hf_weight_files(directory: str) -> List[str]:
    """The weight files of an HF checkpoint directory: the shards named by a *.index.json, else
    model*.safetensors, else pytorch_model*.bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(directory, index_name)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                if not shards or not all(isinstance(s, str) for s in shards):
                    raise ValueError("weight_map names no shard files")
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
                raise ConversionError(f"{index}: truncated or malformed index ({type(e).__name__}: {e}); "
                                      "expected {\"weight_map\": {tensor name: shard file}}") from None
            return [os.path.join(directory, s) for s in shards]
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        files = sorted(glob.glob(os.path.join(directory, pattern)))
        if files:
            return files
    raise ConversionError(f"{directory}: no model*.safetensors, pytorch_model*.bin or *.index.json found")


def read_hf_weights(directory: str) -> StateDict:
    """All tensors of an HF checkpoint directory, shards merged (a name in two shards is an error)."""
    state: StateDict = {}
    for path in hf_weight_files(directory):
        shard = read_tensor_file(path)
        dup = set(state) & set(shard)
        if dup:
            raise ConversionError(f"{path}: tensor {sorted(dup)[0]!r} also appears in another shard")
        state.update(shard)
    return state
