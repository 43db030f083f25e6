"""Export a pretraining checkpoint (emu_mc/checkpoint.py, written by any TP x PP x DP layout):

    python -m emu_mc.convert export --checkpoint runs/tiny --to emu --out /ckpt/emu-tiny
    python -m emu_mc.convert export --checkpoint runs/tiny --to hf --out /ckpt/emu-tiny-llm-hf

--checkpoint: a run's train.out_dir or its checkpoints/ directory (both follow `latest`), or one
step_N/ directory. The model is rebuilt from the config saved with the checkpoint and loaded into
one process (TP = PP = 1; megatron-core dist_checkpointing reshards the saved layout); the optimizer
state is not read. --to emu writes our whole-model format (model_format.py: every component, for
model.init_from); --to hf the LLM as an HF LlamaForCausalLM directory with the run's tokenizer.
"""
import os
from typing import Tuple

import torch

from emu_mc.convert.errors import ConversionError


def resolve_step_dir(path: str) -> str:
    """A run directory, its checkpoints/ directory or a step directory -> the step directory."""
    from emu_mc.checkpoint import Checkpointer

    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    for run_dir in (path, os.path.dirname(os.path.normpath(path))):
        if os.path.isfile(os.path.join(run_dir, "checkpoints", "latest")):
            return Checkpointer(run_dir, keep=1).latest()
    raise ConversionError(f"--checkpoint {path}: no pretraining checkpoint there (expected a run's train.out_dir, "
                          "its checkpoints/ directory with `latest`, or a step_N/ directory with meta.json)")


def load_checkpoint_model(step_dir: str):
    """(EmuModel with the checkpoint's weights, its Config, tokenizer, meta) in this single process."""
    from emu_mc.checkpoint import Checkpointer
    from emu_mc.config import ConfigError, config_from_dict
    from emu_mc.model.emu import EmuModel
    from emu_mc.parallel.groups import init_distributed
    from emu_mc.tokenizer import load_tokenizer, special_token_ids

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError("export runs in one process; run it without torchrun")
    checkpointer = Checkpointer(os.path.dirname(os.path.dirname(os.path.abspath(step_dir))), keep=1)
    meta = checkpointer.read_meta(step_dir)
    try:
        cfg = config_from_dict(meta["config"])
        tokenizer = load_tokenizer(cfg.model.tokenizer)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as err:
        raise ConversionError(f"{step_dir}/meta.json: {err}") from None
    init_distributed(1, 1, seed=cfg.train.seed)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    model = EmuModel(cfg.model, special_token_ids(tokenizer), len(tokenizer), params_dtype=dtype)
    state, _, _ = checkpointer.load(step_dir, {"model": model.sharded_state_dict()}, same_layout=False)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, tokenizer, meta


def export_checkpoint(checkpoint: str, to: str, out: str) -> Tuple[str, int]:
    """Write the checkpoint at `checkpoint` to `out` as `to` ("emu" or "hf"); returns (step dir, step)."""
    from emu_mc.checkpoint import CheckpointLoadError
    from emu_mc.convert.hf import write_hf_llm
    from emu_mc.convert.model_format import write_whole_model
    from emu_mc.convert.shard import gather_llm_state

    step_dir = resolve_step_dir(checkpoint)
    try:
        model, cfg, tokenizer, meta = load_checkpoint_model(step_dir)
    except CheckpointLoadError as err:
        raise ConversionError(str(err)) from None
    vocab_size = len(tokenizer)
    llm_state = gather_llm_state(model.llm, vocab_size=vocab_size)
    os.makedirs(out, exist_ok=True)
    if to == "hf":
        write_hf_llm(out, llm_state, cfg.model.llm, vocab_size)
        tokenizer.save_pretrained(out)
    else:
        write_whole_model(out, model, vocab_size, llm_state, tokenizer,
                          {"checkpoint": os.path.abspath(step_dir), "step": meta["step"]})
    return step_dir, meta["step"]
