"""EVA-CLIP vision tower weights -> our VisionTransformer state dict (emu_mc/model/vision.py).

Accepted layouts (one state dict; the vision tower is found by its unique `*patch_embed.proj.weight`
key, and everything outside that prefix, e.g. a CLIP text tower, is ignored):
    EVA-CLIP / Emu-1 / BLIP-2 eva_vit  prefix `visual.` (or `module.visual.`, or none)
    open_clip with a timm trunk         prefix `visual.trunk.`
    timm `Eva` (use_rot_pos_emb=False)  no prefix
Tensors inside the tower (N = block index):
    patch_embed.proj.{weight,bias}          -> patch_embed.{weight,bias}
    cls_token, pos_embed                     -> same (pos_embed must already match our image size)
    blocks.N.{norm1,norm2}.{weight,bias}, blocks.N.attn.qkv.weight, blocks.N.attn.proj.{weight,bias},
    blocks.N.mlp.{fc1,fc2}.{weight,bias}     -> same
    blocks.N.attn.q_bias, [k_bias], v_bias   -> blocks.N.attn.qkv.bias = [q_bias; k_bias or 0; v_bias]
                                                (our attention never reads the k third, as EVA-CLIP)
    (or blocks.N.attn.qkv.bias               -> same)
    norm.*, fc_norm.*, head.*                -> dropped: Emu-1 takes all tokens after the last block
Anything else (EVA-02 rotary/SwiGLU/sub-LN, layer scale gamma_*, relative position bias) is
unsupported and raises ConversionError naming the tensor.
"""
import math
import re
from typing import Dict

import torch

from emu_mc.convert.errors import ConversionError
from emu_mc.convert.tensor_files import StateDict, read_tensor_file, write_safetensors

_KEPT = re.compile(r"patch_embed\.(weight|bias)|cls_token|pos_embed|blocks\.\d+\.("
                   r"norm[12]\.(weight|bias)|attn\.qkv\.(weight|bias)|attn\.proj\.(weight|bias)|mlp\.fc[12]\.(weight|bias))")
_DROPPED = re.compile(r"(norm|fc_norm|head)\..+")
_SPLIT_BIAS = re.compile(r"(blocks\.\d+\.attn\.)(q_bias|k_bias|v_bias)")


def vision_tower(state: StateDict) -> StateDict:
    """The vision tower's tensors with its prefix stripped (see the module docstring)."""
    roots = [k[: -len("patch_embed.proj.weight")] for k in state if k.endswith("patch_embed.proj.weight")]
    if len(roots) != 1:
        raise ConversionError(f"expected one vision tower (a '*patch_embed.proj.weight' tensor), found {len(roots)}")
    return {k[len(roots[0]):]: v for k, v in state.items() if k.startswith(roots[0])}


def eva_state_to_emu(state: StateDict) -> StateDict:
    """An EVA-CLIP-style state dict -> our VisionTransformer state dict (dtypes kept)."""
    ours: StateDict = {}
    split_biases: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in vision_tower(state).items():
        name = name.replace("patch_embed.proj.", "patch_embed.")
        split = _SPLIT_BIAS.fullmatch(name)
        if split:
            split_biases.setdefault(split[1], {})[split[2]] = tensor
        elif _KEPT.fullmatch(name):
            ours[name] = tensor
        elif not _DROPPED.fullmatch(name):
            raise ConversionError(f"vision tensor {name!r}: not part of the supported EVA-CLIP layout "
                                  "(EVA-02 rotary/SwiGLU/sub-LN, layer scale and relative position bias are unsupported)")
    for attn, parts in split_biases.items():
        if "q_bias" not in parts or "v_bias" not in parts:
            raise ConversionError(f"vision tensor {attn}q_bias/v_bias: found only {sorted(parts)}")
        if attn + "qkv.bias" in ours:
            raise ConversionError(f"vision tensor {attn}qkv.bias: given both fused and split (q_bias/v_bias)")
        k_bias = parts.get("k_bias", torch.zeros_like(parts["q_bias"]))
        ours[attn + "qkv.bias"] = torch.cat([parts["q_bias"], k_bias, parts["v_bias"]])
    return ours


def describe_vision(ours: StateDict) -> Dict[str, int]:
    """The VisionConfig fields readable from the weights' shapes (num_heads is not)."""
    width, _, patch, _ = ours["patch_embed.weight"].shape
    blocks = {int(k.split(".")[1]) for k in ours if k.startswith("blocks.")}
    grid = math.isqrt(ours["pos_embed"].shape[1] - 1)
    return dict(width=width, num_layers=len(blocks), patch_size=patch, image_size=grid * patch,
                mlp_hidden=ours["blocks.0.mlp.fc1.weight"].shape[0] if blocks else 0)


def eva_to_emu(eva_file: str, out_file: str) -> Dict[str, int]:
    """Convert an EVA-CLIP checkpoint file into our vision safetensors; returns describe_vision()."""
    ours = eva_state_to_emu(read_tensor_file(eva_file))
    for required in ("patch_embed.weight", "pos_embed", "cls_token"):
        if required not in ours:
            raise ConversionError(f"{eva_file}: missing vision tensor {required!r}")
    write_safetensors(out_file, ours)
    return describe_vision(ours)
