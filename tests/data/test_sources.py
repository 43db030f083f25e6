"""Each source round-trips: shards written with webdataset's TarWriter come back from the loader as
the expected token sequences, with the expected images decoded as PIL / PyAV decode them."""
import io
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from emu_mc.data import build_data_loader
from emu_mc.data.decode import uniform_frame_indices
from emu_mc.model.targets import check_image_blocks

from tests.data.helpers import PHOTOS, documents, encode_image, encode_video, expected_pixels, pan_frames, photo, write_shard

SIZE = 32  # tiny config image_size


def one_epoch(cfg, tokenizer, special_ids, n_docs):
    """The first n_docs documents the loader yields (one source, micro-batch 1)."""
    loader = build_data_loader(cfg, tokenizer)
    docs = []
    while len(docs) < n_docs:
        batch = next(loader)
        check_image_blocks(batch.input_ids, batch.images.shape[0], cfg.model.resampler.num_queries, special_ids)
        docs += documents(batch, special_ids.img_begin)
    return docs[:n_docs], loader


def by_tokens(docs):
    return {tuple(tokens): images for tokens, images in docs}


def test_image_text_round_trip(tmp_path, data_cfg, tokenizer, special_ids, encode, block):
    samples, expected = [], {}
    for i, name in enumerate(PHOTOS):
        fmt, ext = [("jpeg", "jpg"), ("png", "png"), ("webp", "webp")][i % 3]
        caption = f"A photograph of the {name.replace('_', ' ')}."
        member = {"txt": caption} if i % 2 else {"json": json.dumps({"caption": caption, "url": "x"})}
        data = encode_image(photo(name), fmt)
        samples.append({"__key__": f"s{i:03d}", ext: data, **member})
        expected[tuple([special_ids.bos] + block + encode(caption) + [special_ids.eos])] = (data, photo(name))
    shard = write_shard(tmp_path / "laion-000000.tar", samples)
    cfg = data_cfg([("image_text", shard, 1.0)], micro_batch_size=1, seq_length=64)
    docs, loader = one_epoch(cfg, tokenizer, special_ids, len(samples))
    got = by_tokens(docs)
    assert set(got) == set(expected)
    for tokens, (data, original) in expected.items():
        assert got[tokens].shape == (1, 3, SIZE, SIZE) and got[tokens].dtype == torch.float32
        with Image.open(io.BytesIO(data)) as img:
            assert torch.equal(got[tokens][0], expected_pixels(np.asarray(img.convert("RGB")), SIZE))
        assert (got[tokens][0] - expected_pixels(original, SIZE)).abs().mean() < 0.1  # lossy jpeg/webp
    assert set(loader.stats()["decode_paths"]) == {"image:pil"}


def test_interleaved_round_trip(tmp_path, data_cfg, tokenizer, special_ids, encode, block):
    a, b, c = (encode_image(photo(n), "png") for n in ("coffee", "chelsea", "rocket"))
    doc = {"text_list": ["A morning begins.", "The cup is white.", "", "A cat watches."],
           "image_info": [{"matched_text_index": 1, "image_name": "0.png"},
                          {"matched_text_index": 3, "image_name": "photo.png"},
                          {"matched_text_index": 3}]}  # no name: found as {j}.png
    sample = {"__key__": "d0", "json": json.dumps(doc), "0.png": a, "photo.png": b, "2.png": c}
    shard = write_shard(tmp_path / "mmc4-000000.tar", [sample])
    cfg = data_cfg([("interleaved", shard, 1.0)], micro_batch_size=1, seq_length=128)
    [(tokens, images)], _ = one_epoch(cfg, tokenizer, special_ids, 1)
    assert tokens == ([special_ids.bos] + encode("A morning begins.") + block + encode("The cup is white.")
                      + block + block + encode("A cat watches.") + [special_ids.eos])
    reference = expected_pixels(np.stack([photo("coffee"), photo("chelsea"), photo("rocket")]), SIZE)
    assert torch.equal(images, reference)


@pytest.mark.parametrize("container", ["webm", "mp4"])
def test_video_text_round_trip(tmp_path, data_cfg, tokenizer, special_ids, encode, block, container):
    frames = pan_frames("astronaut", 9)
    video = encode_video(frames, container)
    shard = write_shard(tmp_path / "webvid-000000.tar",
                        [{"__key__": "v0", container: video, "txt": "The camera moves across a portrait."}])
    cfg = data_cfg([("video_text", shard, 1.0)], micro_batch_size=1, seq_length=64, frames_per_video=3)
    [(tokens, images)], loader = one_epoch(cfg, tokenizer, special_ids, 1)
    assert tokens == [special_ids.bos] + block * 3 + encode("The camera moves across a portrait.") + [special_ids.eos]
    indices = uniform_frame_indices(9, 3)
    assert indices == [1, 4, 6]
    with av.open(io.BytesIO(video)) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert torch.equal(images, expected_pixels(decoded[indices], SIZE))  # the PyAV path, frame for frame
    # and they are the frames asked for: each is nearest to its source frame among all nine
    for k, i in enumerate(indices):
        errors = [(images[k] - expected_pixels(f, SIZE)).abs().mean() for f in frames]
        assert int(np.argmin(errors)) == i
    assert set(loader.stats()["decode_paths"]) == {"video:pyav"}


def test_video_interleaved_round_trip(tmp_path, data_cfg, tokenizer, special_ids, encode, block):
    frames = pan_frames("coffee", 3)
    meta = {"frame_timestamps": [2.0, 0.0, 1.0],  # stored out of order: sorted by time
            "subtitle_timestamps": [[0.0, 0.4], [0.4, 0.9], [0.9, 1.0], [1.5, 2.0], [2.5, 3]]}
    subs = ["Coffee in the morning.", "The cup is white.", "The cup is white.", "Closer now.", " "]
    sample = {"__key__": "b0", "json": json.dumps(meta),
              **{f"{i}.png": encode_image(frames[i], "png") for i in range(3)},
              **{f"{i}.txt": s for i, s in enumerate(subs)}}
    shard = write_shard(tmp_path / "board-000000.tar", [sample])
    cfg = data_cfg([("video_interleaved", shard, 1.0)], micro_batch_size=1, seq_length=128)
    [(tokens, images)], _ = one_epoch(cfg, tokenizer, special_ids, 1)
    # frame@0 (before the subtitle starting with it), merged subtitles (repeat dropped), frame@1, ...
    assert tokens == ([special_ids.bos] + block + encode("Coffee in the morning. The cup is white.") + block
                      + encode("Closer now.") + block + [special_ids.eos])
    assert torch.equal(images, expected_pixels(frames[[1, 2, 0]], SIZE))


def test_the_shipped_sample_set_loads(tiny_cfg, tokenizer, special_ids):
    """configs/tiny.yaml reads data/sample: every source appears, every block has its image."""
    tiny_cfg.data.num_workers = 0
    loader = build_data_loader(tiny_cfg, tokenizer)
    for _ in range(6):
        batch = next(loader)
        check_image_blocks(batch.input_ids, batch.images.shape[0], tiny_cfg.model.resampler.num_queries, special_ids)
        assert batch.images.shape[1:] == (3, SIZE, SIZE)
    stats = loader.stats()
    assert set(stats["per_source"]) == {"image_text", "interleaved", "video_text", "video_interleaved"}
    assert stats["skipped"] == {} and stats["bad_shards"] == {}
