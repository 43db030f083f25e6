"""Faults seen by the whole run (emu_mc/pretrain.py): each is one line from rank 0 with a documented
exit code (2 = config / user input, 1 = run stopped, 130 = second Ctrl-C), no traceback from our
workers, and nothing lost (the previous checkpoint stays latest and loads)."""
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.data.helpers import encode_image, photo, write_shard
from tests.torchrun_utils import REPO_ROOT, child_env, torchrun
from tests.train.test_pretrain import (PRETRAIN, latest_checkpoint_step, pretrain_args, run_single_process,
                                       single_process_command, wait_for_step)

JPG = encode_image(photo("chelsea"))


def no_traceback(output: str) -> bool:
    """No traceback from our workers: the only frames allowed are torchrun's own report (its
    ChildFailedError after a worker exits non-zero)."""
    frames = re.findall(r'^  File "([^"]+)"', output, flags=re.MULTILINE)
    return all(f.startswith("<frozen") or "torch/distributed/" in f for f in frames)


@pytest.fixture(scope="module")
def imageless_run(tmp_path_factory):
    """10 steps on an interleaved source whose images are all corrupt: text-only documents.
    Checkpoints every 4 steps and, with train.save_final false, not at step 10."""
    root = tmp_path_factory.mktemp("imageless")
    shard = write_shard(root / "mmc4.tar", [
        {"__key__": f"doc{i}", "0.jpg": JPG[:200],
         "json": json.dumps({"text_list": [f"document {i}", "more words here"],
                             "image_info": [{"matched_text_index": 1, "image_name": "0.jpg"}]})} for i in range(8)])
    out = root / "run"
    args = ("--data.sources", f"[{{kind: interleaved, shards: {shard}}}]", "--train.steps", 10,
            "--data.seq_length", 32, "--train.checkpoint_every", 4, "--train.save_final", "false")
    proc = run_single_process(*pretrain_args(out, *args))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert latest_checkpoint_step(out) == 8
    return out, args, proc.stdout


def test_a_run_without_images_warns_loudly(imageless_run):
    _, _, output = imageless_run
    assert "NO IMAGES in the last 10 steps: the regression loss is not training" in output
    assert "'corrupt_image'" in output  # what the loader dropped, in the warning


def test_a_changed_model_config_is_refused_naming_the_fields(imageless_run, tmp_path):
    out, args, _ = imageless_run
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = run_single_process(*pretrain_args(out, *args, "--train.steps", 12, "--model.llm.num_layers", 3))
    assert proc.returncode == 2, proc.stdout[-4000:]
    assert no_traceback(proc.stdout), proc.stdout[-4000:]
    assert ("holds another model (model.llm.num_layers: checkpoint 2, this run 3). Resume with the checkpoint's "
            "model config, or set another train.out_dir to start afresh") in proc.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_a_damaged_latest_is_one_line(imageless_run, tmp_path):
    out, args, _ = imageless_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "checkpoints" / "latest").write_bytes(b"\x00\xffgarbage")
    proc = run_single_process(*pretrain_args(copy, *args, "--train.steps", 12))
    assert proc.returncode == 1 and no_traceback(proc.stdout), proc.stdout[-4000:]
    assert "run stopped: " in proc.stdout and "names no checkpoint directory" in proc.stdout
    assert "(present: step_000004, step_000008)" in proc.stdout


@pytest.mark.parametrize("overrides, message", [
    (["--train.steps", "--train.log_every", "5"], "config error: override --train.steps: missing value"),
    (["--data.sources", "[{kind: x"], "config error: override --data.sources: line 1 column 10: YAML syntax error"),
    (["--parallel.tensor_parallel", "3"], "model.llm.num_attention_heads: must be divisible by parallel.tensor_parallel"),
])
def test_config_input_errors_are_one_line(tmp_path, overrides, message):
    proc = subprocess.run(single_process_command(*pretrain_args(tmp_path / "run", *overrides)), cwd=REPO_ROOT,
                          env=child_env(WORLD_SIZE="3"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)
    assert proc.returncode == 2 and message in proc.stdout and no_traceback(proc.stdout), proc.stdout


def test_bad_data_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    """DP 2 over a good and a bad shard: the rank reading the bad one exceeds data.max_failure_fraction;
    both ranks stop at the same step, rank 0 reports the culprit once, no worker prints a traceback."""
    write_shard(tmp_path / "s-0.tar", [{"__key__": f"g{i}", "jpg": JPG, "txt": f"cap {i}"} for i in range(8)])
    write_shard(tmp_path / "s-1.tar", [{"__key__": f"b{i}", "jpg": JPG[:100], "txt": "x"} for i in range(8)])
    source = f"[{{kind: image_text, shards: '{tmp_path}/s-{{0..1}}.tar'}}]"
    proc = torchrun(PRETRAIN, pretrain_args(tmp_path / "run", "--data.sources", source, "--data.failure_check_after", 4,
                                            "--data.seq_length", 32), nproc=2, timeout=300, check=False)
    assert proc.returncode != 0
    message = "run stopped: data: "
    assert proc.stdout.count(message) == 1, proc.stdout[-4000:]
    assert "> data.max_failure_fraction 0.1" in proc.stdout and "s-1.tar" in proc.stdout and "(rank " in proc.stdout
    assert no_traceback(proc.stdout), proc.stdout[-4000:]


def test_a_second_ctrl_c_interrupts_at_once_without_a_checkpoint(tmp_path):
    """Both Ctrl-C land within one step (0.1 s apart; a step takes longer): no checkpoint is written."""
    out = tmp_path / "run"
    with open(f"{out}.log", "w") as log:
        proc = subprocess.Popen(single_process_command(*pretrain_args(
            out, "--data.kind", "synthetic", "--train.steps", 100000, "--data.micro_batch_size", 8,
            "--parallel.num_microbatches", 4)), cwd=REPO_ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, Path(f"{out}.log").read_text()[-4000:]
    output = Path(f"{out}.log").read_text()
    assert "interrupted by a second Ctrl-C" in output and no_traceback(output), output[-4000:]
    assert not (out / "checkpoints" / "latest").exists()
