"""Pretraining from remote shards (README "Data in object storage"): the tiny run reading its sources
from http URLs on a loopback server and from `pipe:cat` commands gives the per-step losses of the same
run on the local files, also when it is killed (-9) while fetching a shard and resumed: the loader
fetches the shard it was in again and skips to its sample."""
import subprocess
import time

import pytest

from tests.data.http_shards import ShardServer
from tests.torchrun_utils import REPO_ROOT, child_env
from tests.train.test_pretrain import (LOSS_RTOL, kill_tree, latest_checkpoint_step, pretrain_args, read_metrics,
                                       run_single_process, single_process_command)

STEPS = 12
# The http fetch the first remote run is killed in: after the 2 of data.check_remote, the loader's 6th
# (fetched ahead while step 5 reads the shard before it; step 6 waits for it).
HELD_REQUEST = 2 + 6
ARGS = ("--train.steps", STEPS, "--train.checkpoint_every", 2)
# image_text names each of its two shards twice, so that it fetches a shard late in the run
LOCAL = "[{kind: image_text, shards: 'data/sample/image_text/laion-{000000..000001}.tar::" \
        "data/sample/image_text/laion-{000000..000001}.tar', weight: 2.0}, " \
        "{kind: interleaved, shards: data/sample/interleaved/mmc4-000000.tar, weight: 1.0}, " \
        "{kind: video_text, shards: 'data/sample/video_text/webvid-{000000..000001}.tar', weight: 1.0}, " \
        "{kind: video_interleaved, shards: data/sample/video_interleaved/storyboard-000000.tar, weight: 1.0}]"


def remote_sources(url: str) -> str:
    laion = f"{url}/ok/image_text/laion-{{000000..000001}}.tar"
    return (f"[{{kind: image_text, shards: '{laion}?copy=0::{laion}?copy=1', weight: 2.0}}, "
            "{kind: interleaved, shards: 'pipe:cat data/sample/interleaved/mmc4-000000.tar', weight: 1.0}, "
            f"{{kind: video_text, shards: '{url}/ok/video_text/webvid-{{000000..000001}}.tar', weight: 1.0}}, "
            "{kind: video_interleaved, shards: 'pipe:cat data/sample/video_interleaved/storyboard-000000.tar', "
            "weight: 1.0}]")


def test_remote_shards_train_kill9_and_resume_like_local_files(tmp_path):
    local = run_single_process(*pretrain_args(tmp_path / "local", "--data.sources", LOCAL, *ARGS))
    assert local.returncode == 0, local.stdout[-4000:]

    server = ShardServer("data/sample")
    out, spool_dir = tmp_path / "remote", tmp_path / "spool"
    spool_dir.mkdir()
    args = pretrain_args(out, "--data.sources", remote_sources(server.url), *ARGS, "--data.check_remote", "true",
                         "--data.spool_dir", spool_dir)
    try:
        server.hold_after = HELD_REQUEST - 1
        with open(f"{out}.log", "w") as log:
            proc = subprocess.Popen(single_process_command(*args), cwd=REPO_ROOT, env=child_env(), stdout=log,
                                    stderr=subprocess.STDOUT)
        assert server.held.wait(120), open(f"{out}.log").read()[-4000:]
        time.sleep(0.5)
        assert list(spool_dir.iterdir()) == []  # the local copies are unlinked files
        kill_tree(proc)
        killed_after = max(read_metrics(out))
        server.hold_after = None
        server.gate.set()
        resumed_from = latest_checkpoint_step(out)
        assert 2 <= resumed_from <= killed_after < STEPS, (resumed_from, killed_after)
        first_log = open(f"{out}.log").read()
        assert "data: 8 remote shard(s)" in first_log

        resumed = run_single_process(*args)
        assert resumed.returncode == 0, resumed.stdout[-4000:]
        assert f"at step {resumed_from}" in resumed.stdout
    finally:
        server.close()
    local, remote = read_metrics(tmp_path / "local"), read_metrics(out)
    assert sorted(remote) == sorted(local) == list(range(1, STEPS + 1))
    for step in local:
        for key in ("loss", "ce", "reg", "grad_norm"):
            assert remote[step][key] == pytest.approx(local[step][key], rel=LOSS_RTOL), (step, key)
        assert remote[step]["data_skipped_samples"] == local[step]["data_skipped_samples"] == 0
