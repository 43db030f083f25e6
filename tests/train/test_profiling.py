"""train.profile_step: the profiled step's table is written, other steps are left alone."""
import torch

from emu_mc.profiling import maybe_profile


def test_profiles_only_the_chosen_step(tmp_path):
    for step in (1, 2, 3):
        with maybe_profile(2, step, str(tmp_path), rank=0):
            torch.ones(8, 8) @ torch.ones(8, 8)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["profile_step2_rank0.txt"]
    assert "aten::mm" in (tmp_path / files[0]).read_text()


def test_off_by_default(tmp_path):
    with maybe_profile(0, 1, str(tmp_path), rank=0):
        pass
    assert not any(tmp_path.iterdir())
