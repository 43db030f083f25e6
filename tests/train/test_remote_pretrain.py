"""Pretraining from remote shards (README "Data in object storage"): the tiny run reading its
sources from http URLs on a loopback server and from `pipe:cat` commands gives the per-step losses
of the same run on the local files, and a run stopped at a checkpoint and continued from the remote
shards repeats them too (the loader re-fetches the shard it was in and skips to its sample)."""
import pytest

from tests.data.http_shards import ShardServer
from tests.train.test_pretrain import LOSS_RTOL, pretrain_args, read_metrics, run_single_process

LOCAL = "[{kind: image_text, shards: 'data/sample/image_text/laion-{000000..000001}.tar', weight: 2.0}, " \
        "{kind: interleaved, shards: data/sample/interleaved/mmc4-000000.tar, weight: 1.0}, " \
        "{kind: video_text, shards: 'data/sample/video_text/webvid-{000000..000001}.tar', weight: 1.0}, " \
        "{kind: video_interleaved, shards: data/sample/video_interleaved/storyboard-000000.tar, weight: 1.0}]"
STEPS = 8


def remote_sources(url: str) -> str:
    return (f"[{{kind: image_text, shards: '{url}/ok/image_text/laion-{{000000..000001}}.tar', weight: 2.0}}, "
            "{kind: interleaved, shards: 'pipe:cat data/sample/interleaved/mmc4-000000.tar', weight: 1.0}, "
            f"{{kind: video_text, shards: '{url}/ok/video_text/webvid-{{000000..000001}}.tar', weight: 1.0}}, "
            "{kind: video_interleaved, shards: 'pipe:cat data/sample/video_interleaved/storyboard-000000.tar', "
            "weight: 1.0}]")


def train(out, sources, steps):
    proc = run_single_process(*pretrain_args(out, "--data.sources", sources, "--train.steps", steps,
                                             "--data.check_remote", "true"))
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def test_remote_shards_train_and_resume_like_local_files(tmp_path):
    server = ShardServer("data/sample")
    try:
        train(tmp_path / "local", LOCAL, STEPS)
        out = tmp_path / "remote"
        first = train(out, remote_sources(server.url), STEPS // 2)
        assert "data: 6 remote shard(s)" in first and "check_remote:" in first
        resumed = train(out, remote_sources(server.url), STEPS)
        assert f"at step {STEPS // 2}" in resumed
    finally:
        server.close()
    local, remote = read_metrics(tmp_path / "local"), read_metrics(out)
    assert sorted(remote) == sorted(local) == list(range(1, STEPS + 1))
    for step in local:
        for key in ("loss", "ce", "reg", "grad_norm"):
            assert remote[step][key] == pytest.approx(local[step][key], rel=LOSS_RTOL), (step, key)
        assert remote[step]["data_skipped_samples"] == local[step]["data_skipped_samples"]
