"""Checkpoint faults in one process: a full disk while saving (one line, the partial step_N.tmp
removed, the previous checkpoint still latest and loadable); a model config changed since the
checkpoint; `latest` or meta.json damaged."""
import errno

import pytest
import torch

from emu_mc.checkpoint import CheckpointLoadError, CheckpointSaveError, Checkpointer, check_same_model
from emu_mc.config import ConfigError, config_to_dict, load_config

CONFIG = "configs/tiny.yaml"


def state(value: float):
    from megatron.core.dist_checkpointing import ShardedTensor

    return {"w": ShardedTensor.from_rank_offsets("w", torch.full((4,), value))}


def meta():
    return {"config": config_to_dict(load_config(CONFIG)), "tp": 1, "pp": 1, "dp": 1, "vocab_size": 100}


def test_disk_full_while_saving_is_one_line_and_loses_nothing(tmp_path, single_process_world, monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    checkpointer = Checkpointer(str(tmp_path), keep=2)
    checkpointer.save(1, state(1.0), {"rng": 1}, meta())

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem_async, "_write_item", no_space)  # the forked writers inherit the patch
    with pytest.raises(CheckpointSaveError) as err:
        checkpointer.save(2, state(2.0), {"rng": 2}, meta())
    message = str(err.value)
    assert "\n" not in message and "no space left on the device of" in message, message
    assert "step_000002; step_000001 is still the latest; free space" in message, message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]

    monkeypatch.undo()
    latest = checkpointer.latest()
    loaded, rank_state, saved_meta = checkpointer.load(latest, state(0.0), same_layout=True)
    assert torch.equal(loaded["w"], torch.ones(4)) and rank_state == {"rng": 1} and saved_meta["step"] == 1


def test_a_changed_model_is_named_field_by_field():
    saved = meta()
    run = config_to_dict(load_config(CONFIG, ["--model.llm.num_layers", "4", "--model.llm.ffn_hidden_size", "96",
                                              "--model.llm.freeze", "true", "--model.resampler.dropout", "0.1"]))
    with pytest.raises(ConfigError) as err:
        check_same_model("runs/x/step_000002", saved, run, vocab_size=100)
    message = str(err.value)
    assert ("model.llm.ffn_hidden_size: checkpoint 172, this run 96; model.llm.num_layers: checkpoint 2, this run 4)"
            in message), message
    assert "freeze" not in message and "dropout" not in message  # may change on resume (a new training stage)
    assert "Resume with the checkpoint's model config, or set another train.out_dir" in message
    with pytest.raises(ConfigError, match="tokenizer vocabulary: checkpoint 100 tokens, this run 101"):
        check_same_model("x", saved, saved["config"], vocab_size=101)
    check_same_model("x", saved, saved["config"], vocab_size=100)


@pytest.mark.parametrize("latest", [b"garbage text", b"\xff\xfe\x00binary", b"", b"step_000009", b"../step_000001"])
def test_a_damaged_latest_names_itself_and_the_checkpoints_present(tmp_path, single_process_world, latest):
    checkpointer = Checkpointer(str(tmp_path), keep=2)
    checkpointer.save(1, state(1.0), {}, meta())
    (tmp_path / "checkpoints" / "latest").write_bytes(latest)
    with pytest.raises(CheckpointLoadError, match=r"latest holds .* which names no checkpoint directory .*"
                                                  r"\(present: step_000001\); to start afresh"):
        checkpointer.latest()


def test_a_cut_meta_json_names_the_checkpoint(tmp_path, single_process_world):
    checkpointer = Checkpointer(str(tmp_path), keep=2)
    path = checkpointer.save(1, state(1.0), {}, meta())
    meta_file = tmp_path / "checkpoints" / "step_000001" / "meta.json"
    meta_file.write_text(meta_file.read_text()[:50])
    with pytest.raises(CheckpointLoadError, match=r"cannot load checkpoint .*step_000001 \(meta.json: JSONDecodeError"):
        checkpointer.read_meta(path)
