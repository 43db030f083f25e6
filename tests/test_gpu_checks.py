"""benchmarks/gpu_checks.sh fits a GPU lease: its --dry-run plan stays within the 9-minute budget."""
import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_plan_fits_the_budget():
    out = subprocess.run(["bash", "benchmarks/gpu_checks.sh", "--dry-run"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    total, budget = map(int, re.search(r"total of step limits: (\d+) s \(budget (\d+) s", out.stdout).groups())
    assert total <= budget <= 540
    for step in ("kernel-tests", "resampler-bench", "loss-bench", "train-bench-1b"):
        assert step in out.stdout


def test_bad_flag_is_a_usage_error():
    out = subprocess.run(["bash", "benchmarks/gpu_checks.sh", "--bogus"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "usage:" in out.stdout
