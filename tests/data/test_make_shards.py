"""make_shards: folders of captioned media and jsonl documents -> shards the loader reads back."""
import json

import pytest

from emu_mc.data import build_data_loader
from emu_mc.data.make_shards import main
from emu_mc.data.shards import index_shard, read_sample

from tests.data.helpers import PHOTOS, documents, encode_image, encode_video, pan_frames, photo


def test_folder_of_captioned_images(tmp_path, data_cfg, tokenizer, special_ids):
    src = tmp_path / "photos"
    src.mkdir()
    for name in PHOTOS[:5]:
        (src / f"{name}.jpg").write_bytes(encode_image(photo(name)))
        (src / f"{name}.txt").write_text(f"a photo of {name}")
    (src / "uncaptioned.png").write_bytes(encode_image(photo("coffee"), "png"))
    paths = main([str(src), str(tmp_path / "out" / "laion-%06d.tar"), "--max-samples", "2"])
    assert [p.rsplit("/", 1)[1] for p in paths] == ["laion-000000.tar", "laion-000001.tar", "laion-000002.tar"]
    first = index_shard(paths[0])
    assert [s.key for s in first.samples] == sorted(PHOTOS[:5])[:2]
    assert read_sample(paths[0], first.samples[0])["txt"] == f"a photo of {sorted(PHOTOS[:5])[0]}".encode()
    cfg = data_cfg([("image_text", str(tmp_path / "out" / "laion-*.tar"), 1.0)], micro_batch_size=4, seq_length=40)
    assert len(documents(next(build_data_loader(cfg, tokenizer)), special_ids.img_begin)) >= 4


def test_folder_of_captioned_videos_and_byte_identical_rebuilds(tmp_path):
    src = tmp_path / "clips"
    src.mkdir()
    (src / "a.webm").write_bytes(encode_video(pan_frames("rocket", 4), "webm"))
    (src / "a.txt").write_text("a rocket")
    (src / "b.mp4").write_bytes(encode_video(pan_frames("coffee", 4), "mp4"))
    (src / "b.txt").write_text("a cup")
    first = main([str(src), str(tmp_path / "x-%d.tar")])
    again = main([str(src), str(tmp_path / "y-%d.tar")])
    assert open(first[0], "rb").read() == open(again[0], "rb").read()
    assert sorted(index_shard(first[0]).samples[1].members) == ["mp4", "txt"]


def test_jsonl_documents(tmp_path, data_cfg, tokenizer, special_ids, encode, block):
    (tmp_path / "a.png").write_bytes(encode_image(photo("coffee"), "png"))
    (tmp_path / "f0.jpg").write_bytes(encode_image(photo("rocket")))
    (tmp_path / "f1.jpg").write_bytes(encode_image(photo("chelsea")))
    (tmp_path / "docs.jsonl").write_text(json.dumps(
        {"text_list": ["Morning.", "Coffee."], "images": [{"path": "a.png", "matched_text_index": 1}]}) + "\n")
    (tmp_path / "boards.jsonl").write_text(json.dumps(
        {"frames": [{"path": "f0.jpg", "time": 0.0}, {"path": "f1.jpg", "time": 1.0}],
         "subtitles": [{"text": "Launch.", "start": 0.2, "end": 0.8}]}) + "\n")
    main([str(tmp_path / "docs.jsonl"), str(tmp_path / "mmc4-%06d.tar")])
    main([str(tmp_path / "boards.jsonl"), str(tmp_path / "board-%06d.tar")])
    for kind, shard, expected in [
        ("interleaved", "mmc4-000000.tar", encode("Morning.") + block + encode("Coffee.")),
        ("video_interleaved", "board-000000.tar", block + encode("Launch.") + block),
    ]:
        cfg = data_cfg([(kind, str(tmp_path / shard), 1.0)], micro_batch_size=1, seq_length=64)
        tokens, _ = documents(next(build_data_loader(cfg, tokenizer)), special_ids.img_begin)[0]
        assert tokens == [special_ids.bos] + expected + [special_ids.eos]


def test_help_documents_the_inputs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--max-samples" in text and "sidecar caption" in text and "video_interleaved" in text
