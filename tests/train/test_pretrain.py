"""The product's main job: emu_mc/pretrain.py under torchrun (2 gloo processes) on the tiny config and
the bundled sample data — training, checkpoints, kill -9 + resume, SIGTERM, guard rails."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.data.helpers import encode_image, photo, write_shard
from tests.torchrun_utils import REPO_ROOT, child_env, torchrun, torchrun_command

PRETRAIN = "emu_mc/pretrain.py"
CONFIG = "configs/tiny.yaml"
# Resume runs: 4 microbatches of 8 rows per step (gradient accumulation) make a step take a
# fraction of a second, so a kill lands between checkpoints rather than after the run has ended.
RESUME_ARGS = ["--train.steps", "20", "--train.checkpoint_every", "8", "--data.micro_batch_size", "8",
               "--parallel.num_microbatches", "4"]
LOSS_RTOL = 1e-6  # fp32 on CPU: a resumed run repeats the uninterrupted one up to summation order
LOGGED = ("loss", "ce", "reg", "grad_norm", "lr", "step_time_s", "tokens_per_s", "images_per_s",
          "tflops_per_device", "skipped_steps", "data_skipped_samples")


def pretrain_args(out_dir, *overrides):
    return ["--config", CONFIG, "--train.out_dir", out_dir, *map(str, overrides)]


def read_metrics(out_dir) -> dict:
    """metrics.jsonl as {step: record}; a later record of a step replaces an earlier one."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # being written
            continue
        records[record["step"]] = record
    return records


def latest_checkpoint_step(out_dir) -> int:
    name = (Path(out_dir) / "checkpoints" / "latest").read_text().strip()
    return int(name.split("_")[1])


def start(out_dir, *overrides) -> subprocess.Popen:
    """pretrain.py under torchrun in its own process group, output to out_dir/../<name>.log."""
    cmd, env = torchrun_command(PRETRAIN, pretrain_args(out_dir, *overrides), nproc=2)
    log = open(f"{out_dir}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def single_process_command(*args):
    """argv of python -m emu_mc.pretrain in one process (no torchrun)."""
    return [sys.executable, "-m", "emu_mc.pretrain", *map(str, args)]


def run_single_process(*args, env=None) -> subprocess.CompletedProcess:
    """Run `single_process_command(*args)` to the end; stdout and stderr merged in `.stdout`."""
    return subprocess.run(single_process_command(*args), cwd=REPO_ROOT,
                          env=child_env(**(env or {})),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


def kill_tree(proc) -> None:
    """SIGKILL torchrun and its workers (torchrun starts each worker in a session of its own)."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.kill()
    psutil.wait_procs(tree, timeout=60)
    proc.wait(timeout=60)


def wait_for_step(proc, out_dir, step: int, timeout: float = 240) -> int:
    """Poll metrics.jsonl until it records `step`; returns the newest step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = read_metrics(out_dir)
        if steps and max(steps) >= step:
            return max(steps)
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before step {step}:\n{Path(f'{out_dir}.log').read_text()[-4000:]}")
        time.sleep(0.05)
    kill_tree(proc)
    pytest.fail(f"no step {step} within {timeout}s:\n{Path(f'{out_dir}.log').read_text()[-4000:]}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    torchrun(PRETRAIN, pretrain_args(out, *RESUME_ARGS), nproc=2, timeout=600)
    return read_metrics(out)


def test_trains_logs_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    proc = torchrun(PRETRAIN, pretrain_args(out, "--train.steps", 36, "--train.checkpoint_every", 12), nproc=2,
                    timeout=600)
    metrics = read_metrics(out)
    assert sorted(metrics) == list(range(1, 37))
    for step, record in metrics.items():
        for key in LOGGED:
            assert math.isfinite(record[key]), (step, key, record[key])
        assert record["mfu"] is None  # no peak FLOP/s is known for a CPU
    first = sum(metrics[s]["loss"] for s in range(1, 7)) / 6
    last = sum(metrics[s]["loss"] for s in range(31, 37)) / 6
    assert last < 0.8 * first, f"loss did not go down: first 6 steps {first:.3f}, last 6 {last:.3f}"
    assert all(metrics[s]["reg"] > 0 and metrics[s]["ce"] > 0 for s in metrics)

    root = out / "checkpoints"
    assert latest_checkpoint_step(out) == 36
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == ["step_000024", "step_000036"]
    assert {"meta.json", "rank_00000.pt", "rank_00001.pt"} <= {p.name for p in (root / "step_000036").iterdir()}
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "step 36/36" in proc.stdout


def test_kill9_then_resume_repeats_the_uninterrupted_losses(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = start(out, *RESUME_ARGS)
    killed_after = wait_for_step(proc, out, 11)
    kill_tree(proc)
    resumed_from = latest_checkpoint_step(out)
    assert resumed_from == 8 and killed_after > resumed_from, (resumed_from, killed_after)

    resumed = torchrun(PRETRAIN, pretrain_args(out, *RESUME_ARGS), nproc=2, timeout=600)
    assert f"at step {resumed_from}" in resumed.stdout
    metrics = read_metrics(out)
    assert sorted(metrics) == sorted(uninterrupted) == list(range(1, 21))
    for step in range(1, 21):
        for key in ("loss", "ce", "reg", "grad_norm", "lr"):
            assert metrics[step][key] == pytest.approx(uninterrupted[step][key], rel=LOSS_RTOL), (step, key)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = start(out, "--train.steps", 100000, "--train.checkpoint_every", 0)
    wait_for_step(proc, out, 3)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    for worker in workers:  # what a scheduler's preemption notice does to the job's tasks
        worker.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, Path(f"{out}.log").read_text()[-4000:]
    stopped_at = max(read_metrics(out))
    assert latest_checkpoint_step(out) == stopped_at
    assert f"stopped by signal after step {stopped_at}" in Path(f"{out}.log").read_text()

    resumed = torchrun(PRETRAIN, pretrain_args(out, "--train.steps", stopped_at + 2), nproc=2, timeout=600)
    assert f"at step {stopped_at}" in resumed.stdout
    assert sorted(read_metrics(out)) == list(range(1, stopped_at + 3))


def test_sigterm_to_the_process_groups_after_a_checkpoint_writes_the_stop_checkpoint(tmp_path, uninterrupted):
    """Preemption after a checkpoint exists: SIGTERM to each worker's whole process group (megatron's
    checkpoint-writer helpers included) still writes the stop checkpoint, and the rerun resumes from
    it exactly."""
    out = tmp_path / "run"
    proc = start(out, *RESUME_ARGS, "--train.checkpoint_every", 3)
    wait_for_step(proc, out, 6)
    assert latest_checkpoint_step(out) >= 3
    for worker in psutil.Process(proc.pid).children():
        os.killpg(os.getpgid(worker.pid), signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, Path(f"{out}.log").read_text()[-4000:]
    log = Path(f"{out}.log").read_text()
    assert "Traceback" not in log, log[-4000:]
    stopped_at = max(read_metrics(out))
    assert latest_checkpoint_step(out) == stopped_at > 3

    resumed = torchrun(PRETRAIN, pretrain_args(out, *RESUME_ARGS), nproc=2, timeout=600)
    assert f"at step {stopped_at}" in resumed.stdout
    metrics = read_metrics(out)
    assert sorted(metrics) == list(range(1, 21))
    for step in range(1, 21):
        for key in ("loss", "grad_norm"):
            assert metrics[step][key] == pytest.approx(uninterrupted[step][key], rel=LOSS_RTOL), (step, key)


def test_ctrl_c_checkpoints_and_exits_cleanly(tmp_path):
    """A first SIGINT (Ctrl-C) in a plain `python -m emu_mc.pretrain` run acts like SIGTERM."""
    out = tmp_path / "run"
    with open(f"{out}.log", "w") as log:
        proc = subprocess.Popen(single_process_command(*pretrain_args(out, "--data.kind", "synthetic",
                                                                      "--train.steps", 100000)),
                                cwd=REPO_ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0, Path(f"{out}.log").read_text()[-4000:]
    assert latest_checkpoint_step(out) == max(read_metrics(out))
    assert "SIGINT received" in Path(f"{out}.log").read_text()


def test_bad_samples_are_counted_in_the_metrics(tmp_path):
    jpg = encode_image(photo("chelsea"))
    shard = write_shard(tmp_path / "pairs.tar", [
        {"__key__": f"k{i}", "jpg": jpg if i != 2 else jpg[:100], "txt": f"a cat, photo {i}"} for i in range(6)])
    source = f"[{{kind: image_text, shards: {shard}}}]"
    proc = run_single_process(*pretrain_args(tmp_path / "run", "--data.sources", source,
                                             "--data.max_failure_fraction", 0.5, "--train.steps", 4))
    assert proc.returncode == 0, proc.stdout[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert metrics[4]["data_skipped_samples"] >= 1  # k2 once per epoch read so far
    assert "skipped k2 in" in proc.stdout and "(corrupt_image)" in proc.stdout


def test_a_damaged_checkpoint_is_named_and_an_older_one_can_be_chosen(tmp_path):
    out = tmp_path / "run"
    args = ("--data.kind", "synthetic", "--train.checkpoint_every", 2)
    assert run_single_process(*pretrain_args(out, *args, "--train.steps", 4)).returncode == 0
    for shard in (out / "checkpoints" / "step_000004").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # a disk or copy gone wrong
    proc = run_single_process(*pretrain_args(out, *args, "--train.steps", 6))
    assert proc.returncode == 1
    assert "cannot load checkpoint" in proc.stdout and "step_000004 (EOFError)" in proc.stdout
    assert "(present: step_000002, step_000004)" in proc.stdout
    (out / "checkpoints" / "latest").write_text("step_000002")  # what the message says to do
    proc = run_single_process(*pretrain_args(out, *args, "--train.steps", 6))
    assert proc.returncode == 0 and "at step 2" in proc.stdout, proc.stdout[-3000:]
    assert sorted(read_metrics(out)) == list(range(1, 7))


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
    # A learning rate of 1e30 blows the weights up after the first update; every later step is non-finite.
    proc = run_single_process(*pretrain_args(tmp_path / "run", "--data.kind", "synthetic", "--optim.lr", "1e30",
                                             "--optim.warmup_steps", 0, "--optim.grad_clip", 0,
                                             "--train.max_consecutive_nonfinite", 3, "--train.steps", 20))
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "3 consecutive non-finite steps" in proc.stdout
    metrics = read_metrics(tmp_path / "run")
    assert max(metrics) < 20 and metrics[max(metrics)]["skipped_steps"] == 3


@pytest.mark.parametrize("overrides, env, message", [
    (["--train.precision", "fp16"], {}, "train.precision: 'fp16' is not one of ['fp32', 'bf16']"),
    (["--train.stepz", "3"], {}, "train.stepz: unknown field"),
    (["--parallel.pipeline_parallel", "3", "--model.llm.num_layers", "3"], {"WORLD_SIZE": "2"},
     "world size 2 does not factor"),
    (["--model.tokenizer", "/no/such/dir"], {}, "model.tokenizer: '/no/such/dir' is not a local tokenizer directory"),
    (["--model.llm.init_from", "/no/llm"], {}, "model.llm.init_from: '/no/llm' is not a directory"),
    (["--model.llm.attention_impl", "te"], {}, "model.llm.attention_impl: te needs transformer-engine"),
    (["--data.sources", "[{kind: image_text, shards: '/no/such-{0..3}.tar'}]"], {},
     "data.sources[0].shards: '/no/such-{0..3}.tar' matches no existing file"),
])
def test_bad_config_fails_before_any_process_group(tmp_path, overrides, env, message):
    proc = run_single_process(*pretrain_args(tmp_path / "run", *overrides), env=env)
    assert proc.returncode == 2 and message in proc.stdout, proc.stdout[-3000:]
    assert not (tmp_path / "run").exists()


def test_resume_on_another_data_parallel_size(tmp_path):
    """DP 2 -> DP 1: model and optimizer reshard (dp_reshardable on CPU), training continues."""
    out = tmp_path / "run"
    torchrun(PRETRAIN, pretrain_args(out, "--train.steps", 4), nproc=2, timeout=600)
    proc = run_single_process(*pretrain_args(out, "--train.steps", 6))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "layout changed from TP 1 x PP 1 x DP 2 to TP 1 x PP 1 x DP 1" in proc.stdout
    metrics = read_metrics(out)
    assert sorted(metrics) == list(range(1, 7))
    assert metrics[5]["loss"] < metrics[1]["loss"]  # it continued from trained weights, not from scratch

    proc = torchrun(PRETRAIN, pretrain_args(out, "--train.steps", 8, "--parallel.tensor_parallel", 2), nproc=2,
                    timeout=600, check=False)
    assert proc.returncode != 0 and proc.stdout.count("reloads only into the same TP x PP") == 1, proc.stdout[-3000:]
    assert "config error: the latest checkpoint was written by TP 1 x PP 1" in proc.stdout  # exit code 2, rank 0 only


@pytest.mark.parametrize("variant", [("--parallel.distributed_optimizer", "false"), ("--train.precision", "bf16")],
                         ids=["replicated_optimizer", "bf16"])
def test_stop_at_a_checkpoint_and_continue_repeats_the_uninterrupted_losses(tmp_path, variant):
    """Run 3 steps, then the same command for 6: the losses equal one 6-step run. With a replicated
    optimizer (every DP rank holds all of its state), and in bf16 (fp32 main params in the optimizer)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun(PRETRAIN, pretrain_args(straight, *variant, "--train.steps", 6), nproc=2, timeout=600)
    torchrun(PRETRAIN, pretrain_args(split, *variant, "--train.steps", 3), nproc=2, timeout=600)
    torchrun(PRETRAIN, pretrain_args(split, *variant, "--train.steps", 6), nproc=2, timeout=600)
    expected, resumed = read_metrics(straight), read_metrics(split)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        for key in ("loss", "grad_norm"):
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=LOSS_RTOL), (step, key)
