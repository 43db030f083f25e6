"""The evaluation tasks by name: reader, prompt kind, media, default file naming, generation defaults,
post-processing and metric (lmms-eval's shape: dataset reader + prompt + post-processing + metric)."""
from dataclasses import dataclass
from typing import Dict, List

from emu_mc.evaluate import datasets
from emu_mc.evaluate.caption_metrics import caption_scores
from emu_mc.evaluate.datasets import Example
from emu_mc.evaluate.prompts import clean_caption, shorten_answer
from emu_mc.evaluate.vqa_accuracy import vqa_accuracy


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # caption | vqa | t2i
    media: str  # image | video
    media_name: str = ""  # file name pattern for ids-only annotations
    max_new_tokens: int = 30

    @property
    def metric(self) -> str:
        return {"caption": "CIDEr", "vqa": "accuracy", "t2i": "FID"}[self.kind]


_COCO_IMAGE = "COCO_val2014_{image_id:012d}.jpg"
TASKS: Dict[str, Task] = {t.name: t for t in [
    Task("coco_caption", "caption", "image"),
    Task("nocaps", "caption", "image"),
    Task("flickr30k", "caption", "image"),
    Task("vqav2", "vqa", "image", _COCO_IMAGE, 10),
    Task("okvqa", "vqa", "image", _COCO_IMAGE, 10),
    Task("vizwiz", "vqa", "image", "", 10),
    Task("msvd_qa", "vqa", "video", "vid{video_id}.avi", 10),  # the clips renamed by their question file's ids
    Task("msrvtt_qa", "vqa", "video", "video{video_id}.mp4", 10),
    Task("t2i_coco", "t2i", "image"),
]}


def read_examples(task: Task, data: str, annotations, media_dir: str, media_name: str, split) -> List[Example]:
    name = media_name or task.media_name
    if task.kind in ("caption", "t2i"):
        return datasets.read_captions(data, media_dir, split)
    if task.media == "video":
        return datasets.read_video_qa(data, media_dir, name)
    return datasets.read_vqa(data, annotations, media_dir, name)


def postprocess(task: Task, text: str) -> str:
    return clean_caption(text) if task.kind == "caption" else shorten_answer(text)


def score_text(task: Task, predictions: Dict[str, str], examples: Dict[str, Example], tokenizer: str) -> dict:
    """The task's metrics over the predictions given (ids of `examples`)."""
    references = {k: examples[k].references for k in predictions}
    if task.kind == "caption":
        return caption_scores(predictions, references, tokenizer)
    return {"accuracy": vqa_accuracy(predictions, references)}
