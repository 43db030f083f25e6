"""Loading converted weights into a built model: `load_vision_state`, and `load_pretrained`, which
applies `model.init_from` (a whole exported model, model_format.py), `model.llm.init_from` (an LLM
checkpoint directory, llm_format.py) and `model.vision.init_from` (a vision safetensors file from
eva-to-emu) to an EmuModel stage."""
import logging
import os

import torch

from emu_mc.config import ModelConfig
from emu_mc.convert.errors import ConversionError, check_keys, check_shape
from emu_mc.convert.llm_format import add_vocab_rows, arch_mismatches, read_llm_checkpoint, read_llm_meta
from emu_mc.convert.model_format import load_whole_model, model_mismatches, read_model_meta
from emu_mc.convert.shard import load_llm_state
from emu_mc.convert.tensor_files import StateDict, read_tensor_file

log = logging.getLogger("emu_mc.convert")


@torch.no_grad()
def load_vision_state(vision_model: torch.nn.Module, state: StateDict) -> None:
    """Copy `state` (our VisionTransformer names, any float dtype) into `vision_model`; every tensor
    must be present with its exact shape (the vision tower is replicated, never sharded)."""
    expected = vision_model.state_dict()
    check_keys(list(expected), list(state), "vision state dict")
    for name, tensor in expected.items():
        check_shape(name, tensor.shape, state[name].shape, " in vision state dict")
    vision_model.load_state_dict(state)


def check_init_from(model_cfg: ModelConfig) -> None:
    """Pre-flight, metadata only: every init_from path exists and its architecture matches
    `model_cfg`. Raises ConversionError naming the field, or every differing architecture field."""
    path = model_cfg.init_from
    if path:
        if not os.path.isdir(path):
            raise ConversionError(f"model.init_from: {path!r} is not a directory (python -m emu_mc.convert export "
                                  "--to emu writes one)")
        mismatches = model_mismatches(read_model_meta(path)[0], model_cfg)
        if mismatches:
            raise ConversionError(f"model.init_from: {path} vs model config differ in {'; '.join(mismatches)} "
                                  "(set these fields to the exported model's, see its emu_mc_model.json)")
    path = model_cfg.llm.init_from
    if path:
        if not os.path.isdir(path):
            raise ConversionError(f"model.llm.init_from: {path!r} is not a directory (python -m emu_mc.convert "
                                  "hf-to-emu writes one)")
        mismatches = arch_mismatches(read_llm_meta(path)[0], model_cfg.llm)
        if mismatches:
            raise ConversionError(f"model.llm.init_from: {path} vs model.llm config differ in "
                                  f"{'; '.join(mismatches)} (checkpoint vs config; see its emu_mc_llm.json)")
    path = model_cfg.vision.init_from
    if path and not os.path.isfile(path):
        raise ConversionError(f"model.vision.init_from: {path!r} is not a file (python -m emu_mc.convert "
                              "eva-to-emu writes one)")


def load_pretrained(emu_model, model_cfg: ModelConfig) -> None:
    """Load model_cfg.init_from (a whole exported model) into every component of this stage, or
    model_cfg.llm.init_from into emu_model.llm and model_cfg.vision.init_from into emu_model.vision
    (first pipeline stage only); each is a no-op when empty. Vocab rows the LLM checkpoint lacks (the
    tokenizer's added special tokens) start at the mean of its rows; padding rows past the tokenizer
    are zero. Raises ConversionError."""
    if model_cfg.init_from:
        load_whole_model(emu_model, model_cfg)
        log.info("whole model from %s", model_cfg.init_from)
    path = model_cfg.llm.init_from
    if path:
        state, ckpt_cfg, vocab_size = read_llm_checkpoint(path)
        mismatches = arch_mismatches(ckpt_cfg, model_cfg.llm)
        if mismatches:
            raise ConversionError(f"{path}: checkpoint vs model.llm config differ in " + "; ".join(mismatches))
        load_llm_state(emu_model.llm, add_vocab_rows(state, emu_model.vocab_size))
        log.info("LLM weights from %s: %d tensors, %d checkpoint vocab rows (model vocab %d, new rows = their mean)",
                 path, len(state), vocab_size, emu_model.vocab_size)
    path = model_cfg.vision.init_from
    if path and getattr(emu_model, "vision", None) is not None:
        state = read_tensor_file(path)
        load_vision_state(emu_model.vision, state)
        log.info("vision weights from %s: %d tensors", path, len(state))
