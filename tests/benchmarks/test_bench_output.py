"""Where benchmarks write: runs/bench/ (git-ignored) by default, the committed benchmarks/results/ only
with --update-results, and an explicit --out path exactly as given (benchmarks/gpu_checks.sh uses it)."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.torchrun_utils import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_common  # noqa: E402


def parse(argv):
    parser = argparse.ArgumentParser()
    bench_common.add_output_args(parser, "toy")
    return parser.parse_args(argv)


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the file name's device tag is "cpu"
    runs, results = tmp_path / "runs", tmp_path / "results"
    monkeypatch.setattr(bench_common, "RUNS_DIR", str(runs))
    monkeypatch.setattr(bench_common, "RESULTS_DIR", str(results))
    return runs, results


def save(out):
    return bench_common.save_results("toy", {"rows": [1]}, ["a note"], "a table", out)


def test_default_goes_to_runs_bench_not_committed_results(dirs):
    runs, results = dirs
    path = save(parse([]).out)
    assert path == str(runs / "toy_bench_cpu.json") and not results.exists()
    assert json.load(open(path))["rows"] == [1]
    assert open(str(runs / "toy_bench_cpu.txt")).read() == "a note\n\na table\n"


def test_update_results_writes_the_committed_folder():
    args = parse(["--update-results"])
    assert args.out == os.path.join(bench_common.RESULTS_DIR, "")


def test_explicit_out_is_used_as_given(dirs, tmp_path):  # benchmarks/gpu_checks.sh relies on it
    path = save(parse(["--out", str(tmp_path / "x" / "loss_bench_h100.json")]).out)
    assert path == str(tmp_path / "x" / "loss_bench_h100.json") and os.path.exists(path)
    assert os.path.exists(str(tmp_path / "x" / "loss_bench_h100.txt"))
    folder = save(parse(["--out", str(tmp_path / "y") + os.sep]).out)
    assert folder == str(tmp_path / "y" / "toy_bench_cpu.json")


def test_out_and_update_results_exclude_each_other():
    with pytest.raises(SystemExit):
        parse(["--out", "a.json", "--update-results"])


def test_the_default_folder_is_ignored_by_git():
    rel = os.path.relpath(os.path.join(bench_common.RUNS_DIR, "toy_bench_cpu.json"), REPO_ROOT)
    try:
        proc = subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO_ROOT)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.returncode == 0, f"{rel} is not git-ignored: benchmarks would dirty the tree"
