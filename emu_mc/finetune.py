"""Instruction-tune Emu (Emu-I; README "Instruction tuning"): the pretraining run (emu_mc/pretrain.py:
the same TP x PP x DP stack, run loop, logs, checkpoints and exact resume) from the weights of
model.init_from, with the config's `finetune` section (defaults when absent):

- finetune.mode lora (the released Emu-I's: rank 16, alpha 16, dropout 0.05): LoRA adapters on the LLM's
  attention q, k, v and o (emu_mc/model/lora.py) are the only trainable parameters; the base is frozen
  and out of the optimizer; checkpoints hold the adapters (and their optimizer state) alone, their
  meta.json the base's absolute path (model.init_from, a run directory resolved to its step) and identity;
- finetune.mode full: every weight trains (model.*.freeze still apply); checkpoints are whole.

    torchrun --nproc_per_node=2 emu_mc/finetune.py --config configs/emu_i_tiny.yaml      # CPU, gloo
    torchrun --nproc_per_node=8 emu_mc/finetune.py --config configs/emu_i_14b.yaml
    python -m emu_mc.convert export --checkpoint runs/emu_i_tiny --to emu --out runs/emu_i_tiny-merged

`export` folds the adapters into the base weights; generation (`python -m emu_mc.generate
--checkpoint RUN`) loads a LoRA run directly (merged on load).
"""
import os
import sys

if __package__ in (None, ""):  # run as a file under torchrun: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emu_mc import pretrain


def main(argv=None) -> int:
    return pretrain.main(argv, finetune=True)


if __name__ == "__main__":
    sys.exit(main())
