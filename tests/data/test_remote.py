"""Remote shards (emu_mc/data/remote.py): `pipe:` commands and http URLs served on the loopback by the
test (tests/data/http_shards.py) read the same samples as the local files; a connection that drops,
a stream that stalls, a 404 and a failing command are retried with backoff, then skipped and counted,
never hung on; a loader restored from a state inside a remote shard continues exactly."""
import time

import pytest
import torch

from emu_mc.config import ConfigError
from emu_mc.data import build_data_loader
from emu_mc.data import remote
from emu_mc.data.loader import source_shards
from emu_mc.data.remote import (REMOTE_FAILED, REMOTE_NOT_FOUND, REMOTE_TIMEOUT, RemoteError, RemoteOptions,
                                spool)
from emu_mc.data.shards import expand_shards, index_shard

from tests.data.helpers import documents
from tests.data.http_shards import ShardServer

SAMPLE = "data/sample"
LAION = "image_text/laion-000000.tar"
FAST = RemoteOptions(retries=1, timeout_s=0.5)


@pytest.fixture(scope="module")
def server():
    server = ShardServer(SAMPLE)
    yield server
    server.close()


def spool_error(spec: str, options: RemoteOptions = FAST) -> RemoteError:
    delays = []
    with pytest.raises(RemoteError) as info:
        spool(spec, options, sleep=delays.append)
    assert len(delays) == (0 if info.value.reason == REMOTE_NOT_FOUND else options.retries)
    return info.value


def test_http_and_pipe_shards_hold_the_local_bytes(server):
    local = open(f"{SAMPLE}/{LAION}", "rb").read()
    for spec in (f"{server.url}/ok/{LAION}", f"pipe:cat {SAMPLE}/{LAION}"):
        spooled = spool(spec, FAST)
        assert spooled.size == len(local) and spooled.read(0, len(local)) == local
        assert [s.members for s in index_shard(spec).samples] == [s.members for s in index_shard(f"{SAMPLE}/{LAION}").samples]


def test_brace_patterns_and_double_colons_expand_for_every_kind():
    assert expand_shards("pipe:cat d/a-{0..1}.tar::https://h/b-{08..09}.tar?x=1::s3://bucket/c-{a,b}.tar") == [
        "pipe:cat d/a-0.tar", "pipe:cat d/a-1.tar", "https://h/b-08.tar?x=1", "https://h/b-09.tar?x=1",
        "s3://bucket/c-a.tar", "s3://bucket/c-b.tar"]


@pytest.mark.parametrize("mode, reason, message", [
    ("drop", REMOTE_FAILED, "the connection closed after 35840 of 71680 bytes (3 attempt(s))"),
    ("stall", REMOTE_TIMEOUT, "no data for data.remote_timeout_s = 0.5 s (after 35840 bytes) (3 attempt(s))"),
])
def test_a_dropped_or_stalled_connection_is_retried_then_given_up(server, mode, reason, message):
    options = RemoteOptions(retries=2, timeout_s=0.5)
    start = time.monotonic()
    error = spool_error(f"{server.url}/{mode}/{LAION}", options)
    assert (error.reason, str(error)) == (reason, message)
    assert server.requests[f"/{mode}/{LAION}"] == 3
    assert time.monotonic() - start < 10


def test_a_missing_shard_is_not_retried(server):
    error = spool_error(f"{server.url}/ok/nothing.tar")
    assert (error.reason, str(error)) == (REMOTE_NOT_FOUND, "HTTP 404 Not Found (1 attempt(s))")
    assert server.requests["/ok/nothing.tar"] == 1


def test_a_failure_then_a_success_is_a_good_shard(server):
    assert len(index_shard(f"{server.url}/flaky/{LAION}", FAST).samples) == 5
    assert server.requests[f"/flaky/{LAION}"] == 2


def test_backoff_doubles_up_to_its_cap():
    delays = []
    with pytest.raises(RemoteError):
        spool("pipe:exit 1", RemoteOptions(retries=9, timeout_s=1), sleep=delays.append)
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


@pytest.mark.parametrize("command, reason, message", [
    ("echo no credentials >&2; exit 3", REMOTE_FAILED, "the pipe command exited with status 3: no credentials"),
    ("sleep 30", REMOTE_TIMEOUT, "no data for data.remote_timeout_s = 0.5 s (after 0 bytes)"),
])
def test_a_failing_or_silent_pipe_command_is_given_up(command, reason, message):
    start = time.monotonic()
    error = spool_error(f"pipe:{command}")
    assert error.reason == reason and str(error).startswith(message)
    assert time.monotonic() - start < 5  # the silent command is killed, not waited for


def texts_and_images(loader, special_ids, n_batches):
    docs = [doc for _ in range(n_batches) for doc in documents(next(loader), special_ids.img_begin)]
    return [tokens for tokens, _ in docs], torch.cat([images for _, images in docs])


def test_remote_sources_read_what_local_ones_do_and_resume_exactly(server, data_cfg, tokenizer, special_ids):
    local = data_cfg([("image_text", f"{SAMPLE}/image_text/laion-{{000000..000001}}.tar", 2.0),
                      ("interleaved", f"{SAMPLE}/interleaved/mmc4-000000.tar", 1.0)], micro_batch_size=2,
                     num_workers=2)
    streamed = data_cfg([("image_text", f"{server.url}/ok/image_text/laion-{{000000..000001}}.tar", 2.0),
                         ("interleaved", f"pipe:cat {SAMPLE}/interleaved/mmc4-000000.tar", 1.0)],
                        micro_batch_size=2, num_workers=2)
    expected = texts_and_images(build_data_loader(local, tokenizer), special_ids, 8)
    loader = build_data_loader(streamed, tokenizer)
    first = texts_and_images(loader, special_ids, 3)
    state = loader.state_dict()
    assert any(position[2] > 0 for position in state["positions"])  # inside a shard
    rest = texts_and_images(loader, special_ids, 5)
    assert first[0] + rest[0] == expected[0]
    assert torch.equal(torch.cat([first[1], rest[1]]), expected[1])
    restored = build_data_loader(streamed, tokenizer)
    restored.load_state_dict(state)
    again = texts_and_images(restored, special_ids, 5)
    assert again[0] == rest[0] and torch.equal(again[1], rest[1])
    assert loader.stats()["bad_shards"] == {}


def test_bad_remote_shards_are_skipped_and_counted_by_reason(server, data_cfg, tokenizer, special_ids):
    shards = "::".join([f"{server.url}/ok/image_text/laion-000000.tar", f"{server.url}/drop/{LAION}",
                        f"{server.url}/stall/{LAION}", f"{server.url}/ok/image_text/missing.tar"])
    cfg = data_cfg([("image_text", shards, 1.0)], micro_batch_size=1, remote_retries=1, remote_timeout_s=0.5)
    loader = build_data_loader(cfg, tokenizer)
    start = time.monotonic()
    texts_and_images(loader, special_ids, 12)  # more than one epoch: every shard opened
    assert time.monotonic() - start < 30
    stats = loader.stats()
    assert stats["bad_shard_reasons"] == {REMOTE_FAILED: 1, REMOTE_TIMEOUT: 1, REMOTE_NOT_FOUND: 1}
    assert stats["bad_shards"][f"{server.url}/ok/image_text/missing.tar"] == "HTTP 404 Not Found (1 attempt(s))"


@pytest.mark.parametrize("spec, shown", [
    ("https://b.s3.amazonaws.com/s/{000..009}.tar?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12",
     "https://b.s3.amazonaws.com/s/{000..009}.tar?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("http://user:secret@host:8080/a.tar", "http://***@host:8080/a.tar"),
    ("pipe:curl -s -H 'Authorization: Bearer sk-1' 'https://h/a.tar?sig=q%3D&se=1'",
     "pipe:curl -s -H 'Authorization: Bearer ***' 'https://h/a.tar?sig=***&se=***'"),
    ("pipe:aws s3 cp s3://bucket/a.tar -", "pipe:aws s3 cp s3://bucket/a.tar -"),
    ("/data/laion/000001.tar", "/data/laion/000001.tar"),
])
def test_logs_show_shards_without_credentials(spec, shown):
    assert remote.redact(spec) == shown


def test_checkpoints_record_the_config_without_credentials():
    from emu_mc.config import Config, SourceConfig, config_to_dict

    cfg = Config()
    cfg.data.sources = [SourceConfig(kind="image_text", shards="https://h/{0..9}.tar?X-Amz-Signature=ab12")]
    recorded = remote.without_credentials(config_to_dict(cfg))
    assert recorded["data"]["sources"][0]["shards"] == "https://h/{0..9}.tar?X-Amz-Signature=***"
    assert config_to_dict(cfg)["data"]["sources"][0]["shards"].endswith("ab12")  # the run's own config untouched
    assert {k: v for k, v in recorded.items() if k != "data"} == {k: v for k, v in config_to_dict(cfg).items()
                                                                    if k != "data"}


def test_a_signed_url_never_reaches_the_logs(server, data_cfg, tokenizer, special_ids, caplog):
    """Presigned URLs (the test server ignores the query) read like plain ones; the bad ones' warnings,
    the loader's stats and a failing pipe command's stderr name them without their signatures."""
    signed = "?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeef"
    shards = "::".join([f"{server.url}/ok/{LAION}{signed}", f"{server.url}/drop/{LAION}{signed}",
                        f"{server.url}/ok/image_text/missing.tar{signed}"])
    cfg = data_cfg([("image_text", shards, 1.0)], micro_batch_size=1, remote_retries=0, remote_timeout_s=0.5)
    with caplog.at_level("INFO"):
        loader = build_data_loader(cfg, tokenizer)
        texts_and_images(loader, special_ids, 8)
    assert len(loader.stats()["bad_shards"]) == 2 and "data: shard" in caplog.text
    error = spool_error(f"pipe:echo 'GET https://h/a.tar{signed}: 403' >&2; exit 22", RemoteOptions(retries=0))
    for text in (caplog.text, str(loader.stats()), str(error)):
        assert "X-Amz-Signature=***" in text and "deadbeef" not in text and "AKIAEXAMPLE" not in text


def test_remote_patterns_are_checked_without_reading_data(server, data_cfg, tokenizer, monkeypatch):
    bad_local = data_cfg([("image_text", f"{server.url}/ok/{LAION}::/no/such-{{0..3}}.tar", 1.0)])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].shards: '/no/such-\{0..3\}.tar' matches no existing file"):
        build_data_loader(bad_local, tokenizer)
    monkeypatch.setitem(remote.HAVE_EXTRA, "s3fs", False)
    s3 = data_cfg([("image_text", "s3://bucket/laion-{000000..000009}.tar", 1.0)])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].shards: s3:// shards are read through fsspec and "
                                          r"need the s3fs package: pip install fsspec s3fs"):
        build_data_loader(s3, tokenizer)
    requests = sum(server.requests.values())
    missing = data_cfg([("image_text", f"{server.url}/ok/image_text/gone-{{0..1}}.tar", 1.0)], micro_batch_size=1)
    build_data_loader(missing, tokenizer)  # nothing fetched before the first batch
    assert sum(server.requests.values()) == requests
    with pytest.raises(ConfigError, match=r"data.sources\[0\].shards: data.check_remote: the first shard "
                                          r".*/gone-0.tar is not usable: HTTP 404 Not Found"):
        source_shards(missing, open_first=True)


def test_fsspec_objects_are_spooled_and_a_missing_one_is_not_found(monkeypatch):
    """The s3:// / gs:// path, through fsspec's in-memory filesystem (s3fs and gcsfs are not installed here)."""
    import fsspec

    monkeypatch.setitem(remote.FSSPEC_EXTRAS, "memory", "fsspec")
    monkeypatch.setitem(remote.HAVE_EXTRA, "fsspec", True)
    local = open(f"{SAMPLE}/{LAION}", "rb").read()
    with fsspec.open("memory://bucket/laion-0.tar", "wb") as f:
        f.write(local)
    assert spool("memory://bucket/laion-0.tar", FAST).read(0, len(local)) == local
    error = spool_error("memory://bucket/laion-1.tar")
    assert error.reason == REMOTE_NOT_FOUND and "laion-1.tar" in str(error)


def test_the_next_remote_shard_is_fetched_while_one_is_read(server, data_cfg, tokenizer):
    shards = f"{server.url}/ok/image_text/laion-{{000000..000001}}.tar?ahead"
    loader = build_data_loader(data_cfg([("image_text", shards, 1.0)], micro_batch_size=1), tokenizer)
    loader.streams[0].next_ref()  # opens the first shard of this rank's order
    deadline = time.monotonic() + 10
    while sum(n for path, n in server.requests.items() if path.endswith("?ahead")) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(path for path in server.requests if path.endswith("?ahead")) == [
        "/ok/image_text/laion-000000.tar?ahead", "/ok/image_text/laion-000001.tar?ahead"]
