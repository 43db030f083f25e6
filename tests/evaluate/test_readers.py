"""The annotation readers on each standard layout (tiny hand-written files)."""
import json

import pytest

from emu_mc.evaluate.datasets import read_captions, read_video_qa, read_vqa
from emu_mc.inference.settings import GenerationInputError


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_karpathy_split(tmp_path):
    path = write(tmp_path, "dataset_coco.json", {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "cocoid": 7, "sentences": [{"raw": "A cat."}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "val", "cocoid": 8, "sentences": [{"raw": "A dog."}]},
        {"filepath": "train2014", "filename": "c.jpg", "split": "restval", "cocoid": 9, "sentences": [{"raw": "x"}]}]})
    [ex] = read_captions(path, "/coco", "test")
    assert (ex.id, ex.media, ex.references) == ("7", "/coco/val2014/a.jpg", ["A cat."])
    assert [e.id for e in read_captions(path, "/coco", "train")] == ["9"]  # restval trains, as Karpathy's
    flickr = write(tmp_path, "dataset_flickr30k.json", {"images": [
        {"filename": "1.jpg", "split": "test", "imgid": 3, "sentences": [{"raw": "a man"}, {"raw": "a person"}]}]})
    assert read_captions(flickr, "/f", "test")[0].media == "/f/1.jpg"


def test_lavis_caption_list(tmp_path):
    path = write(tmp_path, "coco_karpathy_test.json", [{"image": "val2014/a.jpg", "caption": ["x", "y"]},
                                                       {"image": "val2014/b.jpg", "caption": "z", "image_id": 5}])
    examples = read_captions(path, "/c")
    assert [(e.id, e.references) for e in examples] == [("val2014/a.jpg", ["x", "y"]), ("5", ["z"])]


def test_vizwiz_and_vqa_without_annotations(tmp_path):
    path = write(tmp_path, "val.json", [{"image": "VizWiz_val_00000001.jpg", "question": "what is this?",
                                         "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10}])
    [ex] = read_vqa(path, None, "/v", "")
    assert (ex.id, ex.media, ex.question) == ("VizWiz_val_00000001", "/v/VizWiz_val_00000001.jpg", "what is this?")
    questions = write(tmp_path, "q.json", {"questions": [{"question_id": 1, "image_id": 2, "question": "?"}]})
    with pytest.raises(GenerationInputError, match="--annotations"):
        read_vqa(questions, None, "/v", "COCO_val2014_{image_id:012d}.jpg")


def test_video_qa_names_and_bad_layout(tmp_path):
    path = write(tmp_path, "test.json", [{"question": "who?", "answer": "man", "video_id": 7010, "id": 0}])
    [ex] = read_video_qa(path, "/m", "video{video_id}.mp4")
    assert (ex.id, ex.media, ex.references) == ("0", "/m/video7010.mp4", ["man"])
    bad = write(tmp_path, "bad.json", [{"q": "?"}])
    with pytest.raises(GenerationInputError, match="bad.json.*missing"):
        read_video_qa(bad, "/m", "{video_id}.mp4")
