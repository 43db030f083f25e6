"""The four pretraining sources: one WebDataset sample (ext -> bytes) -> a list of segments.

Sample layouts (key = the sample's name in the tar; `ext` below = the rest of a member's name):

image_text (LAION style)
    `jpg` | `jpeg` | `png` | `webp` (the image) and `txt` (the caption) or `json` with "caption" or
    "text". Document: image, caption.
interleaved (MMC4 style)
    `json`: {"text_list": [str, ...], "image_info": [{"matched_text_index": int,
    "image_name": str (optional), "image_base64": str (optional)}, ...]}; image j is the member
    named by its "image_name" (e.g. `key.photo1.jpg` -> "photo1.jpg"), else `{j}.jpg|jpeg|png|webp`,
    else its inline base64. Each image goes before the text chunk it matches; consecutive text chunks
    are joined with spaces. Images that are missing or do not decode are dropped (counted).
video_text (WebVid style)
    `mp4` | `webm` | `mkv` | `mov` | `avi` and a caption as for image_text. Document:
    data.frames_per_video uniformly sampled frames (one image block each), caption.
video_interleaved (YT-Storyboard style)
    frames `{i}.jpg|jpeg|png`, subtitles `{i}.txt`, and `json`: {"frame_timestamps": [t_0, ...],
    "subtitle_timestamps": [[start_0, end_0], ...]} (seconds; a bare number is a start time).
    Frames and subtitles are sorted by time (a frame goes before a subtitle starting at the same
    time); adjacent subtitles are merged into one text (repeats of the same line dropped).

Chat samples (instruction tuning) are read by emu_mc/data/chat.py.
"""
import base64
import binascii
import json
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

from emu_mc.data.errors import BAD_JSON, EMPTY_TEXT, MISSING_KEY, NOT_UTF8, SampleError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
CAPTION_KEYS = ("caption", "text")


@dataclass
class Text:
    text: str


@dataclass
class Image:
    data: Optional[bytes]  # None when the image is missing from the sample
    name: str  # for messages: the member ext or "image_info[j]"


@dataclass
class Video:
    data: bytes
    name: str


Segment = Union[Text, Image, Video]
Files = Dict[str, bytes]


def _first(files: Files, exts) -> Optional[str]:
    return next((e for e in exts if e in files), None)


def _json(files: Files, ext: str = "json") -> dict:
    try:
        value = json.loads(files[ext].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError(BAD_JSON, f"{ext}: {e}") from None
    if not isinstance(value, dict):
        raise SampleError(BAD_JSON, f"{ext}: expected an object, got {type(value).__name__}")
    return value


def _utf8(data: bytes, ext: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError(NOT_UTF8, f"{ext} is not UTF-8 text: {e}") from None


def caption(files: Files) -> str:
    """The caption of a pair: `txt`, else `json`["caption" | "text"]. Raises missing_key/empty_text."""
    if "txt" in files:
        text = _utf8(files["txt"], "txt")
    elif "json" in files:
        meta = _json(files)
        found = next((meta[k] for k in CAPTION_KEYS if isinstance(meta.get(k), str)), None)
        if found is None:
            raise SampleError(MISSING_KEY, f"no caption: no txt member and json has none of {list(CAPTION_KEYS)}")
        text = found
    else:
        raise SampleError(MISSING_KEY, "no caption: neither a txt nor a json member")
    text = text.strip()
    if not text:
        raise SampleError(EMPTY_TEXT, "the caption is empty")
    return text


def parse_image_text(files: Files) -> List[Segment]:
    ext = _first(files, IMAGE_EXTS)
    if ext is None:
        raise SampleError(MISSING_KEY, f"no image member (looked for {list(IMAGE_EXTS)}; has {sorted(files)})")
    return [Image(files[ext], ext), Text(caption(files))]


def parse_video_text(files: Files) -> List[Segment]:
    ext = _first(files, VIDEO_EXTS)
    if ext is None:
        raise SampleError(MISSING_KEY, f"no video member (looked for {list(VIDEO_EXTS)}; has {sorted(files)})")
    return [Video(files[ext], ext), Text(caption(files))]


def _interleaved_image(files: Files, info: dict, j: int) -> Image:
    name = info.get("image_name")
    if isinstance(name, str) and name.lower() in files:
        return Image(files[name.lower()], name)
    ext = _first(files, [f"{j}.{e}" for e in IMAGE_EXTS])
    if ext is not None:
        return Image(files[ext], ext)
    inline = info.get("image_base64")
    if isinstance(inline, str):
        try:
            return Image(base64.b64decode(inline, validate=True), f"image_info[{j}].image_base64")
        except (binascii.Error, ValueError):
            pass  # not valid base64: a corrupt image, decoded (and rejected) like any other
        return Image(inline.encode("latin-1", "replace"), f"image_info[{j}].image_base64")
    return Image(None, f"image_info[{j}]")


def merge_texts(segments: List[Segment], drop_repeats: bool = False) -> List[Segment]:
    """Join consecutive Text segments with a space and drop empty ones; with drop_repeats, a line
    equal to the line just before it (a repeated subtitle) is dropped."""
    out: List[Segment] = []
    previous = None
    for seg in segments:
        if not isinstance(seg, Text):
            out.append(seg)
            previous = None
            continue
        text = seg.text.strip()
        if not text or (drop_repeats and text == previous):
            continue
        previous = text
        if out and isinstance(out[-1], Text):
            out[-1] = Text(out[-1].text + " " + text)
        else:
            out.append(Text(text))
    return out


def parse_interleaved(files: Files) -> List[Segment]:
    if "json" not in files:
        raise SampleError(MISSING_KEY, f"no json member (has {sorted(files)})")
    meta = _json(files)
    texts = meta.get("text_list")
    infos = meta.get("image_info", [])
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise SampleError(BAD_JSON if "text_list" in meta else MISSING_KEY, "json text_list must be a list of strings")
    if not isinstance(infos, list) or not all(isinstance(i, dict) for i in infos):
        raise SampleError(BAD_JSON, "json image_info must be a list of objects")
    if not any(t.strip() for t in texts):
        raise SampleError(EMPTY_TEXT, "all text chunks are empty")
    before: Dict[int, List[Image]] = {}
    for j, info in enumerate(infos):
        index = info.get("matched_text_index")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(texts):
            raise SampleError(BAD_JSON, f"image_info[{j}].matched_text_index {index!r} is not an index into text_list")
        before.setdefault(index, []).append(_interleaved_image(files, info, j))
    segments: List[Segment] = []
    for i, text in enumerate(texts):
        segments.extend(before.get(i, []))
        segments.append(Text(text))
    return merge_texts(segments)


def _time(value, what: str) -> float:
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SampleError(BAD_JSON, f"{what}: expected seconds or [start, end], got {value!r}")
    return float(value)


def parse_video_interleaved(files: Files) -> List[Segment]:
    if "json" not in files:
        raise SampleError(MISSING_KEY, f"no json member (has {sorted(files)})")
    meta = _json(files)
    frame_times = meta.get("frame_timestamps")
    sub_times = meta.get("subtitle_timestamps", [])
    if not isinstance(frame_times, list) or not isinstance(sub_times, list):
        raise SampleError(MISSING_KEY if frame_times is None else BAD_JSON,
                          "json needs frame_timestamps (list) and subtitle_timestamps (list)")
    events = []  # (time, 0 = frame / 1 = subtitle, index, segment)
    for i, t in enumerate(frame_times):
        ext = _first(files, [f"{i}.{e}" for e in ("jpg", "jpeg", "png")])
        events.append((_time(t, f"frame_timestamps[{i}]"), 0, i, Image(files[ext] if ext else None, ext or f"frame {i}")))
    if not any(isinstance(e[3], Image) and e[3].data is not None for e in events):
        raise SampleError(MISSING_KEY, f"no frame members {{i}}.jpg|png for {len(frame_times)} frame timestamps")
    for i, t in enumerate(sub_times):
        if f"{i}.txt" in files:
            events.append((_time(t, f"subtitle_timestamps[{i}]"), 1, i, Text(_utf8(files[f"{i}.txt"], f"{i}.txt"))))
    events.sort(key=lambda e: e[:3])
    segments = merge_texts([e[3] for e in events], drop_repeats=True)
    if not any(isinstance(s, Text) for s in segments):
        raise SampleError(EMPTY_TEXT, "no non-empty subtitle")
    return segments


PARSERS: Dict[str, Callable[[Files], List[Segment]]] = {
    "image_text": parse_image_text,
    "interleaved": parse_interleaved,
    "video_text": parse_video_text,
    "video_interleaved": parse_video_interleaved,
}
# Sources whose documents survive losing one image (it is dropped and counted); for the others a bad
# image or video skips the sample.
DROPS_BAD_IMAGES = {"interleaved": True, "video_interleaved": True, "image_text": False, "video_text": False}
