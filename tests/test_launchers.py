"""The launch paths outside Python: scripts/slurm/pretrain.sbatch run with a faked Slurm (one node,
fake srun/scontrol, 2 gloo ranks), and the Makefile's GPU switches (dry runs: nothing installed)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.torchrun_utils import REPO_ROOT, child_env

SBATCH = REPO_ROOT / "scripts" / "slurm" / "pretrain.sbatch"


def fake_slurm_bin(tmp_path):
    """srun runs its command once (one node, one task); scontrol expands any node list to localhost."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
                                  'SLURM_PROCID=0 SLURM_LOCALID=0 exec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo localhost\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sbatch_script_trains_under_a_faked_slurm_job(tmp_path):
    port, out = free_port(), tmp_path / "run"
    env = child_env(PATH=f"{fake_slurm_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable,
                    SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_JOB_NODELIST="node[01]", GPUS_PER_NODE="2",
                    RDZV_PORT=str(port))
    proc = subprocess.run(["bash", str(SBATCH), "--config", "configs/tiny.yaml", "--data.kind", "synthetic",
                           "--train.steps", "2", "--train.out_dir", str(out)], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert f"job 4242, 1 node(s) x 2 process(es), rendezvous localhost:{port}" in proc.stdout
    assert "world 2 = TP 1 x PP 1 x DP 2" in proc.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (out / "checkpoints" / "latest").read_text() == "step_000002"


def test_sbatch_script_outside_slurm_says_so():
    env = {k: v for k, v in child_env().items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SBATCH)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "run this with sbatch" in proc.stderr


def make_dry_run(*args, venv=None):
    """The commands `make` would run (-n), with VENV pointing at `venv`."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    proc = subprocess.run(["make", "-n", *args, *([f"VENV={venv}"] if venv else [])], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_keeps_the_machines_torch_with_an_empty_torch_spec(tmp_path):
    gpu = make_dry_run("env", "TORCH_SPEC=", venv=tmp_path / "venv")
    assert "-m venv --system-site-packages" in gpu and "torch==" not in gpu
    cpu = make_dry_run("env", venv=tmp_path / "venv")
    assert "--system-site-packages" not in cpu and 'pip install -q "torch==2.13.0"' in cpu


def test_make_demo_runs_one_process_per_gpu_else_two(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)  # torch sees this machine's devices
    (venv / ".installed").touch()  # newer than pyproject.toml: nothing to install
    demo = make_dry_run("demo", venv=venv)
    import torch

    assert f"--nproc_per_node={torch.cuda.device_count() or 2} " in demo


def test_make_refuses_a_venv_made_for_the_other_torch(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / ".installed").write_text("TORCH_SPEC=torch==2.13.0\n")  # a CPU venv, up to date
    proc = subprocess.run(["make", "env", "TORCH_SPEC=", f"VENV={tmp_path / 'venv'}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "was made with TORCH_SPEC=torch==2.13.0, not TORCH_SPEC=: run make clean" \
        in proc.stderr, proc.stderr
    same = subprocess.run(["make", "env", f"VENV={tmp_path / 'venv'}"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert same.returncode == 0, same.stderr
