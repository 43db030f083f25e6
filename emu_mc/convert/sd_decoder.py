"""A local diffusers Stable Diffusion directory (v1.5 layout: unet/, vae/, scheduler/, text_encoder/,
tokenizer/, optionally safety_checker/ + feature_extractor/) -> a visual-decoder directory whose UNet
reads Emu's regressed embeddings (width = the LLM width) through its cross-attention
(docs/model.md "Visual decoder training").

What changes: every cross-attention key/value projection (`attn2.to_k`, `attn2.to_v`: Linear(768 ->
inner), no bias) becomes a new Linear(llm_width -> inner), and the UNet config's cross_attention_dim
becomes llm_width. The new layers start from PyTorch's nn.Linear default, drawn with `seed`:
kaiming-uniform, i.e. U(-1/sqrt(llm_width), 1/sqrt(llm_width)); every other UNet weight is copied.
The text encoder and tokenizer are dropped; the VAE, scheduler and safety checker are copied as they are.
"""
import json
import os
import shutil

from emu_mc.convert.errors import ConversionError

NEW_LAYER_SUFFIXES = ("attn2.to_k.weight", "attn2.to_v.weight")
COPIED = ("vae", "scheduler", "safety_checker", "feature_extractor")
CONVERSION_FILE = "emu_mc_decoder.json"


def _is_new(name: str) -> bool:
    return name.endswith(NEW_LAYER_SUFFIXES)


def sd_to_decoder(sd_dir: str, llm_width: int, out_dir: str, seed: int = 0) -> dict:
    """Write the decoder directory; returns a summary (new layers, their init, the UNet size).
    Raises ConversionError naming the directory or field that does not fit."""
    import torch
    from diffusers import UNet2DConditionModel

    if llm_width < 1:
        raise ConversionError(f"--llm-width {llm_width}: must be >= 1 (the LLM's hidden_size, 5120 for Emu-14B)")
    for sub in ("unet", "vae", "scheduler"):
        if not os.path.isdir(os.path.join(sd_dir, sub)):
            raise ConversionError(f"--sd {sd_dir}: no {sub}/ directory; expected a local diffusers Stable Diffusion "
                                  "directory (unet/, vae/, scheduler/, ...)")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"--out {out_dir}: exists and is not empty; choose a new directory")
    try:
        sd_unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet", local_files_only=True,
                                                       low_cpu_mem_usage=False)
    except (OSError, ValueError) as err:
        raise ConversionError(f"--sd {sd_dir}/unet: cannot load the UNet ({str(err).splitlines()[0]})") from None
    old_width = sd_unet.config.cross_attention_dim
    if not isinstance(old_width, int):
        raise ConversionError(f"--sd {sd_dir}/unet: cross_attention_dim {old_width!r} is per block; only one "
                              "width (the SD v1.x layout) is supported")
    config = dict(sd_unet.config)
    config["cross_attention_dim"] = llm_width
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config)
    old = sd_unet.state_dict()
    new = unet.state_dict()
    replaced = sorted(name for name in new if _is_new(name))
    if not replaced:
        raise ConversionError(f"--sd {sd_dir}/unet: no cross-attention key/value projections ({NEW_LAYER_SUFFIXES})")
    missing = sorted(set(new) - set(old))
    if missing:
        raise ConversionError(f"--sd {sd_dir}/unet: missing tensor {missing[0]!r}")
    unet.load_state_dict({name: (new[name] if _is_new(name) else old[name]) for name in new})

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(os.path.join(tmp, "unet"))
    for sub in COPIED:
        if os.path.isdir(os.path.join(sd_dir, sub)):
            shutil.copytree(os.path.join(sd_dir, sub), os.path.join(tmp, sub))
    summary = {"source": os.path.abspath(sd_dir), "llm_width": llm_width, "clip_width": old_width,
               "new_layers": len(replaced), "new_layer_names": replaced,
               "init": f"nn.Linear default (kaiming-uniform: U(-1/sqrt({llm_width}), 1/sqrt({llm_width}))), "
                       f"seed {seed}",
               "dropped": [d for d in ("text_encoder", "tokenizer") if os.path.isdir(os.path.join(sd_dir, d))],
               "unet_params": sum(p.numel() for p in unet.parameters())}
    with open(os.path.join(tmp, CONVERSION_FILE), "w") as f:
        json.dump(summary, f, indent=1)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)
    os.replace(tmp, out_dir)
    return summary
