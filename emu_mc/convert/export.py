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

from emu_mc.convert.errors import ConversionError


def resolve_step_dir(path: str) -> str:
    """A run directory, its checkpoints/ directory or a step directory -> the step directory."""
    from emu_mc.checkpoint import find_step_dir

    step_dir = find_step_dir(path)
    if step_dir is None:
        raise ConversionError(f"--checkpoint {path}: no pretraining checkpoint there (expected a run's train.out_dir, "
                              "its checkpoints/ directory with `latest`, or a step_N/ directory with meta.json)")
    return step_dir


def load_checkpoint_model(step_dir: str):
    """(EmuModel with the checkpoint's weights, its Config, tokenizer, meta) in this single process."""
    from emu_mc import checkpoint

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError("export runs in one process; run it without torchrun")
    try:
        return checkpoint.load_checkpoint_model(step_dir)
    except checkpoint.CheckpointConfigError as err:
        raise ConversionError(str(err)) from None


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
