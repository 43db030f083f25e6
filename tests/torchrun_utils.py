"""Launch a worker script under `torchrun` (gloo on CPU) from pytest and surface its failures.

Workers are plain scripts; they write what the test checks (tensors, JSON) under an output
directory the test passes on their command line. A worker that fails or hangs fails the test with
the tail of every rank's output.
"""
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]


# What a single-process world in the test process (conftest's `single_process_world`) puts in
# os.environ; a child inheriting it would try to join that world's rendezvous port.
_WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> Dict[str, str]:
    """The test process's environment minus its torch.distributed world, plus the repo on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in _WORLD_ENV}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **extra}


def torchrun_command(script: str, args: Sequence[str] = (), nproc: int = 2,
                     env: Optional[Dict[str, str]] = None) -> Tuple[List[str], Dict[str, str]]:
    """(argv, environment) that run `script` (relative to the repo root) on `nproc` local processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO_ROOT / script), *map(str, args)]
    return cmd, child_env(**(env or {}))


def torchrun(script: str, args: Sequence[str] = (), *, nproc: int = 2, timeout: float = 300,
             env: Optional[Dict[str, str]] = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `script` (a path relative to the repo root) on `nproc` local processes.

    Returns the finished process (stdout and stderr merged in `.stdout`); raises AssertionError with
    the output's tail when it exits non-zero (if `check`) or runs past `timeout` seconds.
    """
    cmd, full_env = torchrun_command(script, args, nproc, env)
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"{' '.join(cmd)} ran past {timeout}s:\n{out[-6000:]}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc
