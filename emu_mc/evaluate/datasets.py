"""Annotation readers for the standard formats -> Examples.

Captions (coco_caption, nocaps, flickr30k, t2i_coco):
  - COCO caption json: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}
    (nocaps' val json has the same layout);
  - Karpathy split json (dataset_coco.json / dataset_flickr30k.json): {"images": [{"filename",
    "filepath"?, "split", "sentences": [{"raw"}], "cocoid"? | "imgid"}]}, filtered by --split;
  - LAVIS-style list: [{"image": path, "caption": str | [str], "image_id"?}] (coco_karpathy_test.json).
VQA (vqav2, okvqa): VQAv2 questions json {"questions": [{"question_id", "image_id", "question"}]} plus
  annotations json {"annotations": [{"question_id", "answers": [{"answer"}]}]}; image files named by
  --media-name (default COCO_val2014_{image_id:012d}.jpg) unless a question names its "image";
  VizWiz: [{"image", "question", "answers": [{"answer"}]}] in one file.
Video QA (msvd_qa, msrvtt_qa): [{"question_id" | "id", "video" | "video_id", "question", "answer"}];
  video files named by --media-name (default vid{video_id}.avi for MSVD, video{video_id}.mp4 for MSRVTT)
  unless a record names its "video".
Media paths are relative to --media-dir (default: the annotation file's directory).
"""
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import List, Optional

from emu_mc.inference.settings import GenerationInputError


@dataclass
class Example:
    id: str
    media: Optional[str] = None  # image or video file (None for t2i prompts without a reference image)
    question: Optional[str] = None
    references: List[str] = field(default_factory=list)  # captions, or the human answers


def load_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as err:
        raise GenerationInputError(f"{what} {path}: cannot read it ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise GenerationInputError(f"{what} {path}: not JSON ({err})") from None


def _bad(path: str, detail: str) -> GenerationInputError:
    return GenerationInputError(f"--data {path}: {detail}")


def read_captions(path: str, media_dir: str, split: Optional[str] = None) -> List[Example]:
    data = load_json(path, "--data")
    try:
        if isinstance(data, list):  # LAVIS-style
            return [Example(str(r.get("image_id", r["image"])), os.path.join(media_dir, r["image"]),
                            references=[r["caption"]] if isinstance(r["caption"], str) else list(r["caption"]))
                    for r in data]
        images = data["images"]
        if images and "sentences" in images[0]:  # Karpathy
            chosen = [im for im in images if split is None or im.get("split") == split
                      or (split == "train" and im.get("split") == "restval")]
            return [Example(str(im.get("cocoid", im.get("imgid"))),
                            os.path.join(media_dir, im.get("filepath", ""), im["filename"]),
                            references=[s["raw"] for s in im["sentences"]]) for im in chosen]
        captions = defaultdict(list)
        for ann in data["annotations"]:
            captions[ann["image_id"]].append(ann["caption"])
        return [Example(str(im["id"]), os.path.join(media_dir, im["file_name"]), references=captions[im["id"]])
                for im in images if captions[im["id"]]]
    except (KeyError, TypeError) as err:
        raise _bad(path, f"not a COCO caption, Karpathy split or LAVIS caption json (missing {err})") from None


def read_vqa(path: str, annotations: Optional[str], media_dir: str, media_name: str) -> List[Example]:
    data = load_json(path, "--data")
    try:
        if isinstance(data, list):  # VizWiz: questions and answers in one file
            return [Example(str(r.get("question_id", os.path.splitext(r["image"])[0])),
                            os.path.join(media_dir, r["image"]), r["question"], [a["answer"] for a in r["answers"]])
                    for r in data]
        if annotations is None:
            raise GenerationInputError("--annotations FILE (the VQA answers json) is needed with a questions json")
        answers = {a["question_id"]: [x["answer"] for x in a["answers"]]
                   for a in load_json(annotations, "--annotations")["annotations"]}
        return [Example(str(q["question_id"]),
                        os.path.join(media_dir, q.get("image") or media_name.format(**q)),
                        q["question"], answers[q["question_id"]]) for q in data["questions"]]
    except (KeyError, TypeError) as err:
        raise _bad(path, f"not a VQAv2 questions/annotations pair or a VizWiz json (missing {err})") from None


def read_video_qa(path: str, media_dir: str, media_name: str) -> List[Example]:
    data = load_json(path, "--data")
    try:
        return [Example(str(r.get("question_id", r.get("id", n))),
                        os.path.join(media_dir, r.get("video") or media_name.format(**r)),
                        r["question"], [r["answer"]] if isinstance(r["answer"], str) else list(r["answer"]))
                for n, r in enumerate(data)]
    except (KeyError, TypeError) as err:
        raise _bad(path, f"not a video QA json list of question/answer/video records (missing {err})") from None


def check_media(examples: List[Example]) -> None:
    """Fail before the model loads on the first media file that is not there."""
    for ex in examples:
        if ex.media is not None and not os.path.isfile(ex.media):
            raise GenerationInputError(f"example {ex.id}: media file {ex.media} not found (set --media-dir / "
                                       "--media-name)")
