"""A trained Emu for generation, from a pretraining checkpoint (emu_mc/checkpoint.py): in one process, or
under torchrun with tensor parallelism over all its processes (TP = world size, PP = 1).

Accepted paths: a run's `train.out_dir`, its `checkpoints/` directory (both resolve `latest`), one
`step_N/` directory, or a whole-model directory (emu_mc/convert/model_format.py: `export --to emu`,
`emu1-to-emu`), which loads with its own tokenizer/ and default settings otherwise. The config saved in
the checkpoint's meta.json rebuilds the model; megatron-core
dist_checkpointing reshards whatever TP x PP layout wrote it into this layout. Weights load in the
dtype the run trained in, then move to the device and dtype asked for (bf16 on CUDA by default).
"""
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from emu_mc.checkpoint import (CheckpointConfigError, CheckpointLoadError, find_step_dir,  # noqa: F401 (re-exported)
                               load_checkpoint_model)
from emu_mc.config import Config
from emu_mc.inference.settings import GenerationInputError
from emu_mc.tokenizer import SpecialTokenIds, load_tokenizer, special_token_ids

log = logging.getLogger("emu_mc.inference")


@dataclass
class LoadedEmu:
    model: "torch.nn.Module"  # EmuModel, eval mode, all layers (PP = 1); the LLM sharded when TP > 1
    cfg: Config  # the run's config, as saved in the checkpoint
    tokenizer: object
    ids: SpecialTokenIds
    checkpoint: str  # the step directory read

    @property
    def device(self) -> torch.device:
        return self.model.regress_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.regress_head.weight.dtype


def resolve_checkpoint(path: str) -> str:
    """A run directory, its checkpoints/ directory or a step directory -> the step directory."""
    step_dir = find_step_dir(path)
    if step_dir is None:
        raise GenerationInputError(
            f"--checkpoint {path}: no model there (expected a pretraining run's out_dir, its checkpoints/ "
            "directory with `latest`, or a step_N/ directory with meta.json)")
    return step_dir


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_emu(path: str, *, tokenizer: Optional[str] = None, device: Optional[torch.device] = None,
             dtype: Optional[torch.dtype] = None, tensor_parallel: Optional[int] = None) -> LoadedEmu:
    """Load the model (and tokenizer) of the checkpoint at `path` for generation.

    `tokenizer` overrides the run's model.tokenizer (a run moved to another machine). Default device:
    CUDA when available; default dtype: bf16 on CUDA, fp32 on CPU. `tensor_parallel` (default: the world
    size, WORLD_SIZE) shards the LLM over that many processes; the rest of the world is data-parallel (1
    replicates the model on each process). Raises GenerationInputError for a path without a model,
    CheckpointLoadError for a damaged one."""
    if os.path.isfile(os.path.join(path, "emu_mc_model.json")):
        return _load_model_dir(path, tokenizer=tokenizer, device=device, dtype=dtype)
    step_dir = resolve_checkpoint(path)
    tp = tensor_parallel or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        model, cfg, tok, meta = load_checkpoint_model(step_dir, tp=tp, tokenizer=tokenizer)
    except CheckpointConfigError as err:
        raise GenerationInputError(f"{err} (--tokenizer DIR points at a moved tokenizer)") from None
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ids = special_token_ids(tok)
    model = model.to(device=device, dtype=dtype).eval()
    log.info("loaded %s (step %s, written by TP %s x PP %s) into TP %d on %s in %s", step_dir, meta.get("step"),
             meta.get("tp"), meta.get("pp"), tp, device, dtype)
    return LoadedEmu(model, cfg, tok, ids, step_dir)


def _load_model_dir(path: str, *, tokenizer: Optional[str], device: Optional[torch.device],
                    dtype: Optional[torch.dtype]) -> LoadedEmu:
    """load_emu for a whole-model directory: its ModelConfig, weights and tokenizer/ (or `tokenizer`)."""
    from emu_mc.convert import ConversionError
    from emu_mc.convert.model_format import TOKENIZER_DIR, load_whole_model, read_model_meta
    from emu_mc.model.emu import EmuModel
    from emu_mc.parallel.groups import init_distributed

    try:
        model_cfg, meta = read_model_meta(path)
        model_cfg.init_from = path
        model_cfg.tokenizer = tokenizer or os.path.join(path, TOKENIZER_DIR)
        cfg = Config(model=model_cfg)
        tok = load_tokenizer(model_cfg.tokenizer, model_cfg.chat_tokens)
        tp = int(os.environ.get("WORLD_SIZE", "1"))
        init_distributed(tp, 1, seed=cfg.train.seed)
        saved_dtype = getattr(torch, meta.get("dtype", "float32"))
        ids = special_token_ids(tok)
        model = EmuModel(model_cfg, ids, len(tok), tp=tp, params_dtype=saved_dtype)
        load_whole_model(model, model_cfg)
    except (ConversionError, FileNotFoundError, AttributeError) as err:
        raise GenerationInputError(f"--checkpoint {path}: {err}") from None
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = model.to(device=device, dtype=dtype).eval()
    log.info("loaded whole-model directory %s into TP %d on %s in %s", path, tp, device, dtype)
    return LoadedEmu(model, cfg, tok, ids, path)


__all__ = ["LoadedEmu", "load_emu", "resolve_checkpoint", "CheckpointLoadError"]
