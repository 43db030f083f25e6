"""Our whole-model format: every trained component of an EmuModel in one directory,

    emu_mc_model.json        {"format": "emu_mc.emu/1", "vocab_size": V, "dtype": ..., "model": {ModelConfig},
                              "source": {"checkpoint": step dir, "step": N}}
    llm.safetensors          the LLM in our LLM format (llm_format.py; with emu_mc_llm.json, so the
    emu_mc_llm.json          directory also works as --model.llm.init_from and with emu-to-hf --emu)
    vision.safetensors       the ViT (VisionTransformer names; usable as --model.vision.init_from)
    components.safetensors   ln_visual.*, resampler.*, regress_head.weight (EmuModel names)
    tokenizer/               the run's tokenizer, special tokens included (--model.tokenizer DIR/tokenizer)

Written by `python -m emu_mc.convert export --to emu` from a pretraining checkpoint; loaded whole by
`model.init_from: DIR` into any TP x PP layout (`load_whole_model`).
"""
import dataclasses
import json
import os
from typing import Any, Dict, List, Tuple

import torch

from emu_mc.config import ModelConfig
from emu_mc.convert.errors import ConversionError, check_keys, check_shape
from emu_mc.convert.llm_format import arch_mismatches, read_llm_checkpoint, write_llm_checkpoint
from emu_mc.convert.shard import load_llm_state
from emu_mc.convert.tensor_files import StateDict, read_tensor_file, write_safetensors

FORMAT = "emu_mc.emu/1"
MODEL_META, VISION_FILE, COMPONENTS_FILE, TOKENIZER_DIR = (
    "emu_mc_model.json", "vision.safetensors", "components.safetensors", "tokenizer")
FIRST_STAGE_PREFIXES, LAST_STAGE_PREFIXES = ("ln_visual.", "resampler."), ("regress_head.",)
# Fields that change no weight and no forward result (training switches, kernels, paths).
_NOT_ARCH = {"freeze", "init_from", "attention_impl", "dropout"}


def _arch(section) -> Dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name not in _NOT_ARCH}


def model_mismatches(saved: ModelConfig, cfg: ModelConfig) -> List[str]:
    """'section.field: saved vs cfg' for every architecture field where the two disagree."""
    out = [f"llm.{m}" for m in arch_mismatches(saved.llm, cfg.llm)]
    for name in ("vision", "resampler"):
        a, b = _arch(getattr(saved, name)), _arch(getattr(cfg, name))
        out += [f"{name}.{k}: {a[k]} vs {b[k]}" for k in a if a[k] != b[k]]
    return out


def write_whole_model(directory: str, model, vocab_size: int, llm_state: StateDict, tokenizer,
                      source: Dict[str, Any]) -> None:
    """Write a whole (TP = PP = 1) EmuModel: `llm_state` is its gathered LLM (gather_llm_state,
    vocab rows trimmed to `vocab_size`), the rest is read off `model`."""
    components = {name: tensor for name, tensor in model.state_dict().items()
                  if name.startswith(FIRST_STAGE_PREFIXES + LAST_STAGE_PREFIXES)}
    write_model_dir(directory, model.cfg, vocab_size, llm_state, model.vision.state_dict(), components,
                    tokenizer, source)


def write_model_dir(directory: str, model_cfg: ModelConfig, vocab_size: int, llm_state: StateDict,
                    vision_state: StateDict, components: StateDict, tokenizer, source: Dict[str, Any]) -> None:
    """Write the format's files from full state dicts: `llm_state` (llm_format.py names, `vocab_size`
    rows), `vision_state` (VisionTransformer names), `components` (EmuModel names: ln_visual.*,
    resampler.*, regress_head.weight), `tokenizer` (saved to tokenizer/), `source` (recorded in the json)."""
    write_llm_checkpoint(directory, llm_state, model_cfg.llm, vocab_size)
    write_safetensors(os.path.join(directory, VISION_FILE), vision_state)
    write_safetensors(os.path.join(directory, COMPONENTS_FILE), components)
    tokenizer.save_pretrained(os.path.join(directory, TOKENIZER_DIR))
    model_cfg = dataclasses.asdict(model_cfg)
    for section in (model_cfg, model_cfg["llm"], model_cfg["vision"]):
        section["init_from"] = ""  # the weights are here now
    meta = {"format": FORMAT, "vocab_size": vocab_size,
            "dtype": str(components["regress_head.weight"].dtype).removeprefix("torch."),
            "model": model_cfg, "source": source}
    with open(os.path.join(directory, MODEL_META), "w") as f:
        json.dump(meta, f, indent=2)


def read_model_dir(directory: str) -> Tuple[ModelConfig, StateDict, StateDict, StateDict, int]:
    """The inverse of write_model_dir, validated: (ModelConfig, LLM state, vision state, components,
    vocab_size); the tokenizer stays in DIR/tokenizer."""
    model_cfg, _ = read_model_meta(directory)
    llm_state, _, vocab_size = read_llm_checkpoint(directory)
    return (model_cfg, llm_state, read_tensor_file(os.path.join(directory, VISION_FILE)),
            read_tensor_file(os.path.join(directory, COMPONENTS_FILE)), vocab_size)


def read_model_meta(directory: str) -> Tuple[ModelConfig, Dict[str, Any]]:
    """emu_mc_model.json -> (the exported ModelConfig, the raw meta)."""
    from emu_mc.config import ConfigError, config_from_dict

    path = os.path.join(directory, MODEL_META)
    try:
        with open(path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ConversionError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r} "
                                  "(python -m emu_mc.convert export --to emu writes it)")
        return config_from_dict({"model": meta["model"]}).model, meta
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise ConversionError(f"{path}: missing or invalid ({type(e).__name__}: {e}); model.init_from takes a "
                              "directory written by python -m emu_mc.convert export --to emu") from None


@torch.no_grad()
def _load_module_prefix(emu_model, state: StateDict, prefixes: Tuple[str, ...], what: str) -> None:
    """Copy the tensors of `state` whose names start with `prefixes` into `emu_model` (exact names, shapes)."""
    own = {k: v for k, v in emu_model.state_dict().items() if k.startswith(prefixes)}
    given = {k: v for k, v in state.items() if k.startswith(prefixes)}
    check_keys(list(own), list(given), what)
    for name, tensor in own.items():
        check_shape(name, tensor.shape, given[name].shape, f" in {what}")
        tensor.copy_(given[name])


def load_whole_model(emu_model, model_cfg: ModelConfig) -> None:
    """Load the export at model_cfg.init_from into this rank's EmuModel stage (any TP x PP): the LLM
    shard everywhere, ViT + ln_visual + resampler on the first stage, the regression head on the last.
    Vocab rows the export lacks (e.g. model.chat_tokens added to a pretrained model) start at the mean
    of its rows. Raises ConversionError naming the differing architecture fields or the offending tensor."""
    directory = model_cfg.init_from
    saved, _ = read_model_meta(directory)
    mismatches = model_mismatches(saved, model_cfg)
    if mismatches:
        raise ConversionError(f"{directory}: exported model vs model config differ in " + "; ".join(mismatches))
    llm_state, _, _ = read_llm_checkpoint(directory)
    load_llm_state(emu_model.llm, llm_state, emu_model.vocab_size)
    components = os.path.join(directory, COMPONENTS_FILE)
    if emu_model.pre_process:
        vision = os.path.join(directory, VISION_FILE)
        _load_module_prefix(emu_model, {"vision." + k: v for k, v in read_tensor_file(vision).items()},
                            ("vision.",), vision)
        _load_module_prefix(emu_model, read_tensor_file(components), FIRST_STAGE_PREFIXES, components)
    if emu_model.post_process:
        _load_module_prefix(emu_model, read_tensor_file(components), LAST_STAGE_PREFIXES, components)
