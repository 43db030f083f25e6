"""Sharding, mixture, resume and packing: disjoint per-rank shares whose union is the epoch; a
restored loader continues exactly (with and without worker threads); epochs wrap with a new shuffle;
packed batches keep documents and image blocks whole."""
import json
import pickle

import pytest
import torch

from emu_mc.data import build_data_loader
from emu_mc.data.shards import expand_shards
from emu_mc.data.stream import SourceStream
from emu_mc.model.targets import check_image_blocks

from tests.data.helpers import PHOTOS, documents, encode_image, encode_video, pan_frames, photo, write_shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """image_text: 10 samples over 3 shards; video_text: 3 (VP9 + H.264); interleaved: 3."""
    root = tmp_path_factory.mktemp("shards")
    for s, keys in enumerate([range(0, 4), range(4, 7), range(7, 10)]):
        write_shard(root / f"laion-{s:06d}.tar", [
            {"__key__": f"img{i:03d}", "jpg": encode_image(photo(PHOTOS[i % len(PHOTOS)])),
             "txt": f"caption number {i}"} for i in keys])
    write_shard(root / "webvid-000000.tar", [
        {"__key__": f"vid{i}", ("webm", "mp4")[i % 2]: encode_video(pan_frames(PHOTOS[i], 4), ("webm", "mp4")[i % 2]),
         "txt": f"video number {i}"} for i in range(3)])
    write_shard(root / "mmc4-000000.tar", [
        {"__key__": f"doc{i}", "0.png": encode_image(photo(PHOTOS[i]), "png"),
         "json": json.dumps({"text_list": [f"document number {i}", "more text"],
                             "image_info": [{"matched_text_index": 1, "image_name": "0.png"}]})} for i in range(3)])
    return {"image_text": str(root / "laion-{000000..000002}.tar"), "video_text": str(root / "webvid-000000.tar"),
            "interleaved": str(root / "mmc4-000000.tar")}


def mixed(data_cfg, shards, **data):
    sources = [("image_text", shards["image_text"], 2.0), ("video_text", shards["video_text"], 1.0),
               ("interleaved", shards["interleaved"], 1.0)]
    return data_cfg(sources, **{"seq_length": 96, "micro_batch_size": 2, **data})


def epoch_keys(pattern, dp_rank, dp_size, epoch=0):
    """The keys rank `dp_rank` reads in `epoch`, in order."""
    stream = SourceStream(0, "image_text", expand_shards(pattern), seed=7, dp_rank=dp_rank, dp_size=dp_size,
                          on_bad_shard=lambda index: None)
    keys = []
    while True:
        _, ref = stream.next_ref()
        if stream.position[0] > epoch:  # position is now just past the sample read
            return keys
        if stream.position[0] == epoch:
            keys.append(ref.key)


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4, 5])
def test_ranks_read_disjoint_shares_whose_union_is_the_epoch(shards, dp_size):
    everything = {f"img{i:03d}" for i in range(10)}
    shares = [epoch_keys(shards["image_text"], r, dp_size) for r in range(dp_size)]
    for r, share in enumerate(shares):
        assert len(share) == len(set(share)), f"rank {r} reads a sample twice in one epoch"
    assert sum(len(s) for s in shares) == 10
    assert set().union(*shares) == everything


def test_epochs_wrap_with_a_new_shuffle(shards):
    first, second = epoch_keys(shards["image_text"], 0, 1, 0), epoch_keys(shards["image_text"], 0, 1, 1)
    assert sorted(first) == sorted(second) and first != second


def batches(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same(a, b):
    for x, y in zip(a, b):
        for name in ("input_ids", "position_ids", "segment_ids", "images"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(data_cfg, shards, tokenizer, workers):
    cfg = mixed(data_cfg, shards, num_workers=workers, prefetch=3)
    uninterrupted = build_data_loader(cfg, tokenizer)
    reference = batches(uninterrupted, 9)  # more than an epoch of every source
    interrupted = build_data_loader(cfg, tokenizer)
    assert_same(batches(interrupted, 4), reference[:4])
    state = pickle.loads(pickle.dumps(interrupted.state_dict()))
    assert len(pickle.dumps(state)) < 4096
    interrupted.close()
    resumed = build_data_loader(cfg, tokenizer)
    resumed.load_state_dict(state)
    assert_same(batches(resumed, 5), reference[4:])
    assert resumed.stats() == uninterrupted.stats()  # counters travel with the state


def test_output_does_not_depend_on_workers(data_cfg, shards, tokenizer):
    serial = batches(build_data_loader(mixed(data_cfg, shards, num_workers=0), tokenizer), 6)
    threaded = batches(build_data_loader(mixed(data_cfg, shards, num_workers=2, prefetch=2), tokenizer), 6)
    assert_same(serial, threaded)


def test_ranks_and_seeds_change_the_stream(data_cfg, shards, tokenizer, special_ids):
    def first_docs(rank, size, seed):
        cfg = mixed(data_cfg, shards)
        cfg.train.seed = seed
        return [tuple(t) for b in batches(build_data_loader(cfg, tokenizer, dp_rank=rank, dp_size=size), 3)
                for t, _ in documents(b, special_ids.img_begin)]

    assert first_docs(0, 1, 1) == first_docs(0, 1, 1)
    assert first_docs(0, 1, 1) != first_docs(0, 1, 2)
    assert first_docs(0, 2, 1) != first_docs(1, 2, 1)


def test_mixture_follows_the_weights(data_cfg, shards, tokenizer):
    loader = build_data_loader(mixed(data_cfg, shards), tokenizer)
    picks = []
    for n in range(4000):
        loader.draws = n
        picks.append(loader._choose())
    share = [picks.count(k) / len(picks) for k in range(3)]
    assert share == pytest.approx([0.5, 0.25, 0.25], abs=0.03)


def test_batches_keep_documents_and_image_blocks_whole(data_cfg, shards, tokenizer, special_ids):
    cfg = mixed(data_cfg, shards, seq_length=48)  # tight: rows hold one or two documents
    loader = build_data_loader(cfg, tokenizer)
    for batch in batches(loader, 8):
        assert batch.input_ids.shape == batch.position_ids.shape == batch.segment_ids.shape == (2, 48)
        assert batch.input_ids.dtype == torch.long and batch.images.dtype == torch.float32
        check_image_blocks(batch.input_ids, batch.images.shape[0], cfg.model.resampler.num_queries, special_ids)
        for row in range(2):
            seg, pos, ids = batch.segment_ids[row], batch.position_ids[row], batch.input_ids[row]
            pad = seg < 0
            assert torch.all(ids[pad] == special_ids.pad) and torch.all(pos[pad] == 0)
            assert not torch.any(pad[:-1] & ~pad[1:]), "padding only at the end"
            for d in range(int(seg.max()) + 1):
                doc = ids[seg == d]
                assert doc[0] == special_ids.bos and doc[-1] == special_ids.eos
                assert torch.equal(pos[seg == d], torch.arange(len(doc)))


def test_synthetic_loader_is_deterministic_and_resumable(tiny_cfg, tokenizer, special_ids):
    tiny_cfg.data.kind = "synthetic"
    tiny_cfg.data.images_per_synthetic_sample = 2
    reference = batches(build_data_loader(tiny_cfg, tokenizer, dp_rank=1, dp_size=2), 4)
    assert reference[0].images.shape == (2 * tiny_cfg.data.micro_batch_size, 3, 32, 32)
    check_image_blocks(reference[0].input_ids, reference[0].images.shape[0], 8, special_ids)
    loader = build_data_loader(tiny_cfg, tokenizer, dp_rank=1, dp_size=2)
    batches(loader, 2)
    state = loader.state_dict()
    assert state == {"kind": "synthetic", "batches": 2}
    resumed = build_data_loader(tiny_cfg, tokenizer, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    assert_same(batches(resumed, 2), reference[2:])
    other_rank = batches(build_data_loader(tiny_cfg, tokenizer, dp_rank=0, dp_size=2), 1)[0]
    assert not torch.equal(other_rank.input_ids, reference[0].input_ids)


def test_state_of_another_kind_is_refused(data_cfg, shards, tokenizer):
    loader = build_data_loader(mixed(data_cfg, shards), tokenizer)
    with pytest.raises(ValueError, match="data.kind 'synthetic'"):
        loader.load_state_dict({"kind": "synthetic", "batches": 3})
