"""Bad input never stops the run: corrupt images and videos, missing keys, empty texts, bad json,
over-long documents and unreadable shards are skipped (or truncated / dropped) and counted by reason;
too many failures raise DataError; bad config fields name themselves."""
import json
import logging
import tarfile
import threading

import pytest

from emu_mc.config import ConfigError, load_config
from emu_mc.data import DataError, build_data_loader
from emu_mc.data import loader as loader_module
from emu_mc.model.targets import check_image_blocks

from tests.data.helpers import documents, encode_image, encode_video, pan_frames, photo, write_shard

JPG = encode_image(photo("chelsea"))
WEBM = encode_video(pan_frames("rocket", 4), "webm")


def read_docs(cfg, tokenizer, special_ids, n_batches):
    loader = build_data_loader(cfg, tokenizer)
    docs = []
    for _ in range(n_batches):
        batch = next(loader)
        check_image_blocks(batch.input_ids, batch.images.shape[0], cfg.model.resampler.num_queries, special_ids)
        docs += documents(batch, special_ids.img_begin)
    return docs, loader.stats()


def test_bad_pairs_are_skipped_and_counted(tmp_path, data_cfg, tokenizer, special_ids, encode, caplog):
    good = [{"__key__": f"good{i}", "jpg": JPG, "txt": f"good caption {i}"} for i in range(3)]
    bad = [
        {"__key__": "truncated", "jpg": JPG[: len(JPG) // 2], "txt": "x"},
        {"__key__": "garbage", "png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "txt": "x"},
        {"__key__": "no_image", "txt": "a caption without its image"},
        {"__key__": "no_caption", "jpg": JPG},
        {"__key__": "empty", "jpg": JPG, "txt": "  \n"},
        {"__key__": "bad_json", "jpg": JPG, "json": "{not json"},
    ]
    shard = write_shard(tmp_path / "pairs.tar", good[:1] + bad[:3] + good[1:2] + bad[3:] + good[2:])
    videos = write_shard(tmp_path / "videos.tar", [
        {"__key__": "cut", "webm": WEBM[: len(WEBM) // 3], "txt": "x"},
        {"__key__": "noise", "mp4": b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 100, "txt": "x"},
        {"__key__": "vgood", "webm": WEBM, "txt": "good video"}])
    cfg = data_cfg([("image_text", shard, 1.0), ("video_text", videos, 1.0)], micro_batch_size=1,
                   seq_length=40, max_failure_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="emu_mc.data"):
        docs, stats = read_docs(cfg, tokenizer, special_ids, 6)
    texts = {tokenizer.decode([t for t in tokens if t < special_ids.img_begin][1:-1]) for tokens, _ in docs}
    assert texts == {"good caption 0", "good caption 1", "good caption 2", "good video"}
    skipped = stats["skipped"]
    assert skipped["corrupt_image"] >= 2 and skipped["missing_key"] >= 2 and skipped["empty_text"] >= 1
    assert skipped["bad_json"] >= 1 and skipped["corrupt_video"] >= 2
    assert "skipped garbage in" in caplog.text and "pairs.tar (corrupt_image)" in caplog.text


def test_interleaved_documents_lose_only_their_bad_images(tmp_path, data_cfg, tokenizer, special_ids, encode, block):
    doc = {"text_list": ["one", "two", "three"],
           "image_info": [{"matched_text_index": 0, "image_name": "0.jpg"},
                          {"matched_text_index": 1, "image_name": "1.jpg"},
                          {"matched_text_index": 2, "image_name": "missing.jpg"}]}
    shard = write_shard(tmp_path / "docs.tar", [
        {"__key__": "d0", "json": json.dumps(doc), "0.jpg": JPG, "1.jpg": b"\xff\xd8\xff\xe0broken"},
        {"__key__": "d1", "json": json.dumps({"text_list": ["", " "], "image_info": []})},
        {"__key__": "d2", "json": json.dumps({"text_list": ["x"], "image_info": [{"matched_text_index": 5}]})},
        {"__key__": "d3", "json": json.dumps([1, 2])}])
    cfg = data_cfg([("interleaved", shard, 1.0)], micro_batch_size=1, seq_length=64, max_failure_fraction=1.0)
    docs, stats = read_docs(cfg, tokenizer, special_ids, 2)
    space = encode(" ")  # texts that meet where an image was dropped are joined by a space
    expected = [special_ids.bos] + block + encode("one") + space + encode("two") + space + encode("three") + [
        special_ids.eos]
    assert all(tokens == expected and images.shape[0] == 1 for tokens, images in docs)
    assert stats["images_dropped"]["corrupt_image"] >= 1 and stats["images_dropped"]["missing_key"] >= 1
    assert stats["skipped"]["empty_text"] >= 1 and stats["skipped"]["bad_json"] >= 2


def test_storyboard_with_missing_frames_and_no_json(tmp_path, data_cfg, tokenizer, special_ids, encode, block):
    meta = json.dumps({"frame_timestamps": [0, 1, 2], "subtitle_timestamps": [0.5]})
    shard = write_shard(tmp_path / "boards.tar", [
        {"__key__": "b0", "json": meta, "0.jpg": JPG, "2.jpg": b"junk", "0.txt": "hello"},
        {"__key__": "b1", "0.jpg": JPG, "0.txt": "no json"}])
    cfg = data_cfg([("video_interleaved", shard, 1.0)], micro_batch_size=1, seq_length=64, max_failure_fraction=1.0)
    docs, stats = read_docs(cfg, tokenizer, special_ids, 2)
    assert docs[0][0] == [special_ids.bos] + block + encode("hello") + [special_ids.eos]
    assert set(stats["images_dropped"]) == {"missing_key", "corrupt_image"}  # frames 1 and 2 of b0
    assert stats["skipped"]["missing_key"] >= 1


def test_overlong_documents_are_truncated_between_blocks_or_skipped(tmp_path, data_cfg, tokenizer, special_ids,
                                                                   encode, block):
    long_text = " ".join(["coffee"] * 80)
    doc = {"text_list": ["start", long_text], "image_info": [{"matched_text_index": 1, "image_name": "0.jpg"},
                                                              {"matched_text_index": 1, "image_name": "1.jpg"}]}
    sample = {"__key__": "long", "json": json.dumps(doc), "0.jpg": JPG, "1.jpg": JPG}
    short = {"__key__": "short", "json": json.dumps({"text_list": ["fits"], "image_info": []})}
    shard = write_shard(tmp_path / "long.tar", [sample, short])
    cfg = data_cfg([("interleaved", shard, 1.0)], micro_batch_size=1, seq_length=32, max_failure_fraction=1.0)
    docs, stats = read_docs(cfg, tokenizer, special_ids, 2)
    tokens, images = next(d for d in docs if len(d[0]) == 32)
    # 2 + "start" + 2 blocks (20) leaves room for a few words; blocks stay whole, eos is kept
    assert tokens[:1 + len(encode("start"))] == [special_ids.bos] + encode("start")
    assert tokens[1 + len(encode("start")):][:2 * len(block)] == block + block and images.shape[0] == 2
    assert tokens[-1] == special_ids.eos and stats["truncated"] >= 1
    cfg = data_cfg([("interleaved", shard, 1.0)], micro_batch_size=1, seq_length=32, max_failure_fraction=1.0,
                   overlong="skip")
    docs, stats = read_docs(cfg, tokenizer, special_ids, 2)
    assert stats["skipped"]["too_long"] >= 1 and all(len(t) < 32 for t, _ in docs)
    # a block that cannot fit at all is left out, never cut
    cfg = data_cfg([("interleaved", shard, 1.0)], micro_batch_size=1, seq_length=16, max_failure_fraction=1.0)
    docs, stats = read_docs(cfg, tokenizer, special_ids, 2)
    assert any(images.shape[0] == 1 for _, images in docs), (docs, stats)


def test_unreadable_and_truncated_shards_are_logged_and_the_rest_is_read(tmp_path, data_cfg, tokenizer,
                                                                        special_ids, caplog):
    good = write_shard(tmp_path / "s-000000.tar", [{"__key__": f"k{i}", "jpg": JPG, "txt": f"cap {i}"} for i in range(3)])
    with tarfile.open(good) as tar:
        cut = tar.getmember("k1.jpg").offset_data + 100
    (tmp_path / "s-000001.tar").write_bytes(open(good, "rb").read()[:cut])  # cut inside sample k1
    (tmp_path / "s-000002.tar").write_bytes(b"this is not a tar file" * 40)
    cfg = data_cfg([("image_text", str(tmp_path / "s-{000000..000003}.tar"), 1.0)], micro_batch_size=1,
                   seq_length=40)  # 000003 does not exist
    with caplog.at_level(logging.WARNING, logger="emu_mc.data"):
        docs, stats = read_docs(cfg, tokenizer, special_ids, 4)
    assert len(docs) >= 4
    assert set(stats["bad_shards"]) >= {str(tmp_path / f"s-00000{i}.tar") for i in (1, 3)}
    assert "s-000003.tar" in caplog.text


def test_a_source_without_any_readable_sample_is_a_data_error(tmp_path, data_cfg, tokenizer):
    (tmp_path / "junk.tar").write_bytes(b"junk" * 100)
    cfg = data_cfg([("image_text", str(tmp_path / "junk.tar"), 1.0)])
    with pytest.raises(DataError, match="no readable sample"):
        next(build_data_loader(cfg, tokenizer))


def test_failure_fraction_limit_raises(tmp_path, data_cfg, tokenizer):
    samples = [{"__key__": f"k{i:02d}", "jpg": JPG if i % 2 else b"bad", "txt": "caption"} for i in range(20)]
    shard = write_shard(tmp_path / "half-bad.tar", samples)
    cfg = data_cfg([("image_text", shard, 1.0)], max_failure_fraction=0.2, failure_check_after=6)
    loader = build_data_loader(cfg, tokenizer)
    with pytest.raises(DataError, match=r"unusable .* > data.max_failure_fraction 0.2.*corrupt_image"):
        for _ in range(20):
            next(loader)
    assert 6 <= loader.stats()["samples_read"] <= 12
    cfg = data_cfg([("image_text", shard, 1.0)], max_failure_fraction=0.6, failure_check_after=6)
    loader = build_data_loader(cfg, tokenizer)
    for _ in range(20):
        next(loader)
    assert loader.stats()["skipped"]["corrupt_image"] > 10


@pytest.fixture
def hanging_reads(monkeypatch):
    """Reading a sample whose key is in the returned set blocks (a hung filesystem) until the test ends;
    once per key (a later epoch reads it normally)."""
    keys, release = set(), threading.Event()
    real_read = loader_module.read_sample

    def read_sample(path, ref):
        if ref.key in keys:
            keys.discard(ref.key)
            release.wait()
        return real_read(path, ref)

    monkeypatch.setattr(loader_module, "read_sample", read_sample)
    yield keys
    release.set()


def test_a_stuck_sample_times_out_and_the_rest_is_read(tmp_path, data_cfg, tokenizer, special_ids, hanging_reads):
    hanging_reads.add("k03")
    shard = write_shard(tmp_path / "pairs.tar",
                        [{"__key__": f"k{i:02d}", "jpg": JPG, "txt": f"caption {i}"} for i in range(8)])
    cfg = data_cfg([("image_text", shard, 1.0)], micro_batch_size=1, seq_length=40, num_workers=2, prefetch=2,
                   sample_timeout_s=0.5, max_failure_fraction=1.0)
    caption = lambda tokens: tokenizer.decode([t for t in tokens if t < special_ids.img_begin][1:-1])
    docs, stats = read_docs(cfg, tokenizer, special_ids, 6)
    assert stats["skipped"] == {"timeout": 1}
    hanging_reads.clear()
    expected, _ = read_docs(cfg, tokenizer, special_ids, 6)  # the same stream, nothing stuck
    expected = [caption(tokens) for tokens, _ in expected]
    expected.remove("caption 3")  # its first occurrence: the sample that timed out
    assert [caption(tokens) for tokens, _ in docs][:len(expected)] == expected


def test_every_worker_stuck_is_a_data_error_not_a_hang(tmp_path, data_cfg, tokenizer, hanging_reads):
    hanging_reads.update({"k00", "k01"})
    shard = write_shard(tmp_path / "pairs.tar", [{"__key__": f"k{i:02d}", "jpg": JPG, "txt": "x"} for i in range(4)])
    cfg = data_cfg([("image_text", shard, 1.0)], num_workers=2, prefetch=1, sample_timeout_s=0.3)
    with pytest.raises(DataError, match=r"all 2 data worker threads are stuck.*: k0[01] in .*pairs.tar"):
        next(build_data_loader(cfg, tokenizer))


@pytest.mark.parametrize("override,message", [
    (["--data.decoder", "gpu"], "data.decoder: 'gpu' is not one of"),
    (["--data.overlong", "cut"], "data.overlong: 'cut' is not one of"),
    (["--data.sources", "[]"], "data.sources: must be at least one source"),
    (["--data.sources", "[{kind: laion, shards: a.tar}]"], "data.sources[0].kind: 'laion' is not one of"),
    (["--data.sources", "[{kind: image_text, shards: ''}]"], "data.sources[0].shards: must be a path"),
    (["--data.sources", "[{kind: image_text, shards: a.tar, weight: -1}]"], "data.sources[0].weight: must be >= 0"),
    (["--data.sources", "[{kind: image_text, shards: a.tar, url: x}]"], "data.sources[0].url: unknown field"),
    (["--data.num_workers", "-1"], "data.num_workers: must be >= 0"),
    (["--data.prefetch", "0"], "data.prefetch: must be >= 1"),
    (["--data.sample_timeout_s", "-1"], "data.sample_timeout_s: must be >= 0"),
    (["--data.frames_per_video", "0"], "data.frames_per_video: must be >= 1"),
    (["--data.max_failure_fraction", "1.5"], "data.max_failure_fraction: must be in [0, 1]"),
])
def test_bad_config_fields_name_themselves(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("configs/tiny.yaml", override)
    assert message in str(info.value)


def test_shard_pattern_matching_no_file_is_a_config_error(tmp_path, tiny_cfg, tokenizer):
    tiny_cfg.data.sources[1].shards = str(tmp_path / "nothing-{0..3}.tar")
    with pytest.raises(ConfigError, match=r"data.sources\[1\].shards: .* matches no existing file"):
        build_data_loader(tiny_cfg, tokenizer)


def batch_texts(loader, tokenizer, special_ids, n):
    return [tokenizer.decode(tokens) for _ in range(n) for tokens, _ in documents(next(loader), special_ids.img_begin)]


@pytest.mark.parametrize("bad", ["not_a_tar", "missing"])
def test_a_rank_whose_shards_are_unusable_reads_parts_of_the_readable_ones(tmp_path, data_cfg, tokenizer,
                                                                          special_ids, caplog, bad):
    """DP 2 over 4 shards, 2 of them unusable: whichever rank draws only bad shards reads parts of
    the good ones instead of stopping the run; a restored loader continues exactly."""
    for s in (0, 2):
        write_shard(tmp_path / f"s-{s:06d}.tar",
                    [{"__key__": f"s{s}k{i}", "jpg": JPG, "txt": f"shard {s} caption {i}"} for i in range(4)])
    if bad == "not_a_tar":
        for s in (1, 3):
            (tmp_path / f"s-{s:06d}.tar").write_bytes(b"this is not a tar file" * 40)
    cfg = data_cfg([("image_text", str(tmp_path / "s-{000000..000003}.tar"), 1.0)], micro_batch_size=1,
                   seq_length=40)
    with caplog.at_level(logging.WARNING, logger="emu_mc.data"):
        for rank in (0, 1):
            loader = build_data_loader(cfg, tokenizer, dp_rank=rank, dp_size=2)
            batch_texts(loader, tokenizer, special_ids, 5)
            state = loader.state_dict()
            expected = batch_texts(loader, tokenizer, special_ids, 6)
            restored = build_data_loader(cfg, tokenizer, dp_rank=rank, dp_size=2)
            restored.load_state_dict(state)
            assert batch_texts(restored, tokenizer, special_ids, 6) == expected
    assert "it reads parts of the 2 readable shard(s) instead" in caplog.text


def test_a_source_whose_shards_are_all_unusable_stops_on_every_rank(tmp_path, data_cfg, tokenizer):
    for s in (0, 1):
        (tmp_path / f"junk-{s}.tar").write_bytes(b"junk" * 100)
    cfg = data_cfg([("image_text", str(tmp_path / "junk-{0..1}.tar"), 1.0)])
    for rank in (0, 1):
        with pytest.raises(DataError, match=r"source 0 \(image_text\): no readable sample in any of its 2 shard"):
            next(build_data_loader(cfg, tokenizer, dp_rank=rank, dp_size=2))


def test_a_shard_that_blocks_on_open_is_skipped_after_the_timeout(tmp_path, data_cfg, tokenizer, special_ids):
    """A FIFO nobody writes blocks open(); the shard is given up on after data.sample_timeout_s."""
    import os

    write_shard(tmp_path / "s-0.tar", [{"__key__": f"k{i}", "jpg": JPG, "txt": f"caption {i}"} for i in range(3)])
    fifo = tmp_path / "s-1.tar"
    os.mkfifo(fifo)
    try:
        cfg = data_cfg([("image_text", str(tmp_path / "s-{0..1}.tar"), 1.0)], micro_batch_size=1, seq_length=40,
                       sample_timeout_s=0.5)
        docs, stats = read_docs(cfg, tokenizer, special_ids, 4)
        assert len(docs) >= 4
        assert "not opened and indexed within data.sample_timeout_s = 0.5 s" in stats["bad_shards"][str(fifo)]
    finally:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the abandoned thread


def test_a_caption_that_is_not_utf8_has_its_own_reason(tmp_path, data_cfg, tokenizer, special_ids):
    shard = write_shard(tmp_path / "pairs.tar", [{"__key__": "latin1", "jpg": JPG, "txt": "caf\xe9".encode("latin-1")},
                                                 {"__key__": "good", "jpg": JPG, "txt": "a good caption"}])
    cfg = data_cfg([("image_text", shard, 1.0)], micro_batch_size=1, seq_length=40, max_failure_fraction=1.0)
    _, stats = read_docs(cfg, tokenizer, special_ids, 2)
    assert set(stats["skipped"]) == {"not_utf8"}  # not bad_json


def test_resuming_with_other_sources_is_a_config_error(tmp_path, data_cfg, tokenizer):
    shard = write_shard(tmp_path / "pairs.tar", [{"__key__": "k", "jpg": JPG, "txt": "caption"}])
    state = build_data_loader(data_cfg([("image_text", shard, 1.0), ("image_text", shard, 1.0)]),
                              tokenizer).state_dict()
    with pytest.raises(ConfigError, match=r"data.sources: the checkpoint was written reading sources \[0, 1\].*"
                                          r"this run reads \[0\]. Resume with the checkpoint's data.sources"):
        build_data_loader(data_cfg([("image_text", shard, 1.0)]), tokenizer).load_state_dict(state)
