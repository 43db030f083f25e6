"""Loading converted weights into a built model: `load_vision_state`, and `load_pretrained`, which
applies `model.init_from` (a whole exported model, model_format.py, or a pretraining / full fine-tuning
run's checkpoint, emu_mc/checkpoint.py), `model.llm.init_from` (an LLM checkpoint directory,
llm_format.py) and `model.vision.init_from` (a vision safetensors file from eva-to-emu) to an EmuModel
stage. `pin_init_from` fixes the paths a fine-tuning run starts from (the base its adapters belong to)."""
import hashlib
import logging
import os

import torch

from emu_mc.checkpoint import (CheckpointConfigError, CheckpointLoadError, Checkpointer, adapters_only,
                               find_step_dir, load_model_weights)
from emu_mc.config import ModelConfig
from emu_mc.convert.errors import ConversionError, check_keys, check_shape
from emu_mc.convert.llm_format import META_FILE, arch_mismatches, read_llm_checkpoint, read_llm_meta
from emu_mc.convert.model_format import MODEL_META, load_whole_model, model_mismatches, read_model_meta
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
    step_dir = _step_dir(path) if path else None
    if step_dir is not None:
        _check_init_checkpoint(step_dir, model_cfg)
    elif path:
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
    step_dir = _step_dir(model_cfg.init_from) if model_cfg.init_from else None
    if step_dir is not None:
        try:
            load_model_weights(emu_model, step_dir)
        except CheckpointConfigError as err:
            raise ConversionError(f"model.init_from: {err}") from None
        log.info("whole model from checkpoint %s", step_dir)
    elif model_cfg.init_from:
        load_whole_model(emu_model, model_cfg)
        log.info("whole model from %s", model_cfg.init_from)
    path = model_cfg.llm.init_from
    if path:
        state, ckpt_cfg, vocab_size = read_llm_checkpoint(path)
        mismatches = arch_mismatches(ckpt_cfg, model_cfg.llm)
        if mismatches:
            raise ConversionError(f"{path}: checkpoint vs model.llm config differ in " + "; ".join(mismatches))
        load_llm_state(emu_model.llm, state, emu_model.vocab_size)
        log.info("LLM weights from %s: %d tensors, %d checkpoint vocab rows (model vocab %d, new rows = their mean)",
                 path, len(state), vocab_size, emu_model.vocab_size)
    path = model_cfg.vision.init_from
    if path and getattr(emu_model, "vision", None) is not None:
        state = read_tensor_file(path)
        load_vision_state(emu_model.vision, state)
        log.info("vision weights from %s: %d tensors", path, len(state))


def _step_dir(path: str):
    """The step directory a training run's path names (following `latest`), None when it names none."""
    try:
        return find_step_dir(path)
    except CheckpointLoadError as err:
        raise ConversionError(f"init_from {path}: {err}") from None


def _check_init_checkpoint(step_dir: str, model_cfg: ModelConfig) -> None:
    """model.init_from names a training run's checkpoint: a whole model of this architecture."""
    from emu_mc.config import ConfigError, config_from_dict

    meta = Checkpointer.of_step(step_dir).read_meta(step_dir)
    try:
        saved = config_from_dict(meta["config"])
    except (ConfigError, KeyError) as err:
        raise ConversionError(f"model.init_from: {step_dir}/meta.json: {err}") from None
    refusal = adapters_only(meta, step_dir)
    if refusal:
        raise ConversionError(f"model.init_from: {refusal}")
    mismatches = model_mismatches(saved.model, model_cfg)
    if mismatches:
        raise ConversionError(f"model.init_from: {step_dir} vs model config differ in {'; '.join(mismatches)} "
                              "(checkpoint vs config; see its meta.json)")


def pin_init_from(model_cfg: ModelConfig, out_dir: str) -> None:
    """Fix the weights a fine-tuning run starts from, in place: every init_from an absolute path, a run
    directory resolved to its current step directory (a later `latest` must not change the base of
    the adapters). When out_dir holds a checkpoint of this run, its recorded paths win while they
    exist: a resumed run keeps the base it started from (a warning names a config that points
    elsewhere); a base that has moved is taken from the config (its identity is checked on resume)."""
    recorded = latest = None
    try:
        checkpointer = Checkpointer(out_dir, keep=1)
        latest = checkpointer.latest() if os.path.isdir(os.path.join(out_dir, "checkpoints")) else None
        if latest is not None:
            recorded = checkpointer.read_meta(latest)["config"]["model"]
    except (CheckpointLoadError, OSError, ValueError, KeyError, TypeError):
        pass  # a damaged checkpoint: the run reports it when it resumes
    for section, key in ((model_cfg, ""), (model_cfg.llm, "llm"), (model_cfg.vision, "vision")):
        path = section.init_from
        if path:
            path = os.path.abspath(_step_dir(path) or path) if key != "vision" else os.path.abspath(path)
        saved = (recorded.get(key, {}) if key else recorded)["init_from"] if recorded else None
        if saved is not None and saved != path and os.path.exists(saved):
            log.warning("resuming %s with the base it started from, %s.init_from %s (the config says %r)",
                        latest, f"model.{key}" if key else "model", saved, section.init_from)
            path = saved
        section.init_from = path


_IDENTIFYING = ("meta.json", MODEL_META, META_FILE)  # metadata files whose content names the weights


def base_identity(model_cfg: ModelConfig) -> str:
    """A digest of the weights the init_from paths hold, from their metadata files and file sizes (no
    weight is read; the paths themselves do not count, so a moved base keeps its identity). Recorded
    with LoRA adapters and checked whenever they meet their base again."""
    digest = hashlib.sha256()
    for path in (model_cfg.init_from, model_cfg.llm.init_from, model_cfg.vision.init_from):
        files = sorted(os.listdir(path)) if path and os.path.isdir(path) else [""] if path else []
        for name in files:
            full = os.path.join(path, name) if name else path
            if os.path.isfile(full):
                digest.update(f"{name}:{os.path.getsize(full)};".encode())
                if name in _IDENTIFYING:
                    with open(full, "rb") as f:
                        digest.update(f.read())
    return digest.hexdigest()[:16]


def check_base_identity(recorded: str, model_cfg: ModelConfig, checkpoint: str) -> None:
    """ConversionError when the base at model_cfg's init_from is not the one `checkpoint`'s adapters
    were trained on (`recorded`: its base_identity)."""
    found = base_identity(model_cfg)
    if recorded != found:
        raise ConversionError(f"{checkpoint} holds LoRA adapters trained on other base weights than "
                              f"{model_cfg.init_from or model_cfg.llm.init_from} holds now (base identity {recorded}, "
                              f"found {found}); put that base back, or start another train.out_dir")
