"""The LR schedule's horizon (optim.decay_steps) and the warning a resume prints when the schedule it
continues differs from the checkpoint's."""
import pytest

from emu_mc.config import ConfigError, OptimConfig, config_to_dict, load_config
from emu_mc.schedule import decay_horizon, lr_at, schedule_change

TINY = "configs/tiny.yaml"  # lr 3e-3, min_lr 3e-4, warmup 5, 20 steps


def test_decay_steps_defaults_to_train_steps_and_pins_the_cosine():
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert decay_horizon(optim, 104) == 104
    optim.decay_steps = 54
    assert decay_horizon(optim, 104) == 54
    assert lr_at(29, optim, decay_horizon(optim, 104)) == pytest.approx(0.55)  # half way through 4..54
    assert lr_at(80, optim, decay_horizon(optim, 104)) == pytest.approx(0.1)  # min_lr after the horizon


def test_decay_steps_is_validated():
    assert load_config(TINY, ["--optim.decay_steps", "20"]).optim.decay_steps == 20
    with pytest.raises(ConfigError, match="optim.decay_steps: must be >= 1"):
        load_config(TINY, ["--optim.decay_steps", "0"])


def test_same_schedule_resumes_silently():
    saved = config_to_dict(load_config(TINY))
    assert schedule_change(saved, load_config(TINY), 10) is None
    # an explicit decay_steps equal to the old train.steps is the same schedule
    assert schedule_change(saved, load_config(TINY, ["--train.steps", "40", "--optim.decay_steps", "20"]), 20) is None


def test_raising_train_steps_warns_with_the_next_lr_and_the_way_back():
    saved = config_to_dict(load_config(TINY))
    cfg = load_config(TINY, ["--train.steps", "40"])
    message = schedule_change(saved, cfg, 20)
    new_lr = lr_at(20, cfg.optim, 40)
    assert new_lr > 1e-3  # the re-stretched cosine jumps back up from min_lr 3e-4
    assert "decay horizon 20 -> 40 steps" in message
    assert f"step 21 runs at lr {new_lr:.3g} where the checkpoint's schedule gives 0.0003" in message
    assert "cosine to min_lr 0.0003 at step 40" in message and "--optim.decay_steps 20" in message


def test_other_schedule_fields_are_named_without_the_decay_steps_hint():
    saved = config_to_dict(load_config(TINY))
    saved["optim"].pop("decay_steps")  # a checkpoint written before the field existed
    message = schedule_change(saved, load_config(TINY, ["--optim.lr", "1e-3"]), 10)
    assert "optim.lr 0.003 -> 0.001" in message and "decay_steps" not in message
