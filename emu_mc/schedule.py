"""Learning-rate schedule: linear warmup to `lr`, then cosine decay to `min_lr` at the decay horizon
(`optim.decay_steps`, default `train.steps`); constant `min_lr` after it."""
import dataclasses
import math
from typing import Any, Dict, Optional

from emu_mc.config import Config, OptimConfig

_SHAPE_FIELDS = ("lr", "min_lr", "warmup_steps")  # with the horizon, all that lr_at reads


def decay_horizon(optim: OptimConfig, train_steps: int) -> int:
    """The step at which the cosine reaches min_lr: optim.decay_steps, or train.steps when unset."""
    return optim.decay_steps if optim.decay_steps is not None else train_steps


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Base learning rate for optimizer step `step` (0-based) of a schedule whose cosine ends at
    `total_steps` (`decay_horizon`); per-component scales apply on top."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay_steps = max(total_steps - optim.warmup_steps, 1)
    progress = min(max(step - optim.warmup_steps, 0) / decay_steps, 1.0)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


def schedule_change(saved: Dict[str, Any], cfg: Config, step: int) -> Optional[str]:
    """A warning for a resume whose LR schedule differs from the checkpoint's, or None.

    `saved`: the checkpoint's config as a dict (meta.json "config"); `step`: the next optimizer step
    (0-based). The message says what the LR does next under `cfg` and, when only the horizon moved,
    how to keep the checkpoint's schedule.
    """
    known = {f.name for f in dataclasses.fields(OptimConfig)}
    old = OptimConfig(**{k: v for k, v in saved.get("optim", {}).items() if k in known})
    old_horizon = decay_horizon(old, saved.get("train", {}).get("steps", cfg.train.steps))
    new_horizon = decay_horizon(cfg.optim, cfg.train.steps)
    changes = [f"optim.{name} {getattr(old, name)} -> {getattr(cfg.optim, name)}"
               for name in _SHAPE_FIELDS if getattr(old, name) != getattr(cfg.optim, name)]
    if old_horizon != new_horizon:
        changes.append(f"decay horizon {old_horizon} -> {new_horizon} steps")
    if not changes:
        return None
    was, now = lr_at(step, old, old_horizon), lr_at(step, cfg.optim, new_horizon)
    message = (f"LR schedule differs from the checkpoint's ({'; '.join(changes)}): step {step + 1} runs at lr "
               f"{now:.3g} where the checkpoint's schedule gives {was:.3g}, then ")
    if step >= new_horizon:
        message += f"it stays at min_lr {cfg.optim.min_lr:.3g}"
    else:
        message += f"cosine to min_lr {cfg.optim.min_lr:.3g} at step {new_horizon}"
    if len(changes) == 1 and old_horizon != new_horizon:
        message += (f". To continue the checkpoint's schedule instead (min_lr after step {old_horizon}), "
                    f"pass --optim.decay_steps {old_horizon}")
    return message
