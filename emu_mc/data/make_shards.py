"""Write WebDataset shards the loader reads (layouts: emu_mc/data/sources.py).

    python -m emu_mc.data.make_shards photos/ out/laion-%06d.tar            # image_text
    python -m emu_mc.data.make_shards clips/ out/webvid-%06d.tar            # video_text
    python -m emu_mc.data.make_shards docs.jsonl out/mmc4-%06d.tar          # interleaved
    python -m emu_mc.data.make_shards boards.jsonl out/storyboard-%06d.tar  # video_interleaved
    python -m emu_mc.data.make_shards llava_instruct.json out/chat-%06d.tar --format llava --image-root coco/
    python -m emu_mc.data.make_shards sharegpt.jsonl out/chat-%06d.tar --format sharegpt   # chat

A folder: every image (jpg|jpeg|png|webp) or video (mp4|webm|mkv|mov|avi) with a sidecar caption
`<name>.txt` becomes one sample (files without a caption are skipped with a warning); a folder must
hold images or videos, not both. A jsonl: one document per line, paths relative to the jsonl file:
  interleaved:       {"text_list": [str, ...], "images": [{"path": str, "matched_text_index": int}, ...]}
  video_interleaved: {"frames": [{"path": str, "time": float}, ...],
                      "subtitles": [{"text": str, "start": float, "end": float}, ...]}
Chat (--format llava | sharegpt, or auto: a .json list, or a .jsonl whose first record has
`conversations` / `messages`): LLaVA-Instruct / ShareGPT records (emu_mc/data/chat.py, docs/chat_data.md)
  {"image": str | [str], "video": str | [str], "system": str,  (optional)
   "conversations": [{"from": "human" | "gpt", "value": "<image>\nWhat is ...?"}, ...]}
whose media paths are relative to --image-root (default: the file's folder). The turns are checked
when the loader reads them (bad ones are skipped and counted there), the media files here.
Samples go to consecutive shards of at most --max-samples each; files are stored as they are
(no re-encoding) with mtime 0, so the same input gives byte-identical shards. Bad input (a missing
or undecodable image, a jsonl line that is not JSON or lacks a field) stops with one line naming the
file, line and field, exit code 2, and the shards written so far are removed.
"""
import argparse
import io
import json
import logging
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

from emu_mc.data.chat import media_list
from emu_mc.data.errors import SampleError
from emu_mc.data.sources import IMAGE_EXTS, VIDEO_EXTS

log = logging.getLogger("emu_mc.data")
Sample = Dict[str, bytes]  # "__key__" -> key (str), ext -> bytes


class ShardInputError(ValueError):
    """Input make_shards cannot use; the message names the file (and jsonl line and field)."""


def _read(path: str, where: str) -> bytes:
    """The bytes of `path`; an image must also decode. `where` names the input that refers to it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ShardInputError(f"{where}: cannot read {path} ({e.strerror or e})") from None
    if _ext(path) in IMAGE_EXTS:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
        except Exception as e:  # PIL raises many types for a damaged file
            raise ShardInputError(f"{where}: {path} is not a decodable image ({type(e).__name__}: {e})") from None
    return data


def _field(doc: dict, name: str, kind: type, where: str) -> Any:
    """doc[name], which must exist and be a `kind`."""
    if name not in doc:
        raise ShardInputError(f"{where}: missing field {name!r}")
    if not isinstance(doc[name], kind) or isinstance(doc[name], bool):
        raise ShardInputError(f"{where}: field {name!r} must be a {kind.__name__}, got {doc[name]!r}")
    return doc[name]


def _ext(path: str) -> str:
    return os.path.splitext(path)[1][1:].lower()


def folder_samples(folder: str) -> Tuple[str, Iterator[Sample]]:
    """(kind, samples) for a folder of captioned images or videos, in file-name order."""
    names = sorted(os.listdir(folder))
    media = [n for n in names if _ext(n) in IMAGE_EXTS + VIDEO_EXTS]
    kinds = {"image_text" if _ext(n) in IMAGE_EXTS else "video_text" for n in media}
    if len(kinds) != 1:
        raise ShardInputError(f"{folder}: expected images or videos (not both, not none); found {len(media)} media files")

    def samples() -> Iterator[Sample]:
        for name in media:
            stem = os.path.splitext(name)[0]
            caption = os.path.join(folder, stem + ".txt")
            if not os.path.exists(caption):
                log.warning("make_shards: %s has no caption %s.txt; skipped", name, stem)
                continue
            path = os.path.join(folder, name)
            yield {"__key__": stem, _ext(name): _read(path, path), "txt": _read(caption, caption)}

    return kinds.pop(), samples()


def interleaved_sample(key: str, doc: dict, root: str, where: str) -> Sample:
    """An MMC4-style document (see the module docstring) -> json + {j}.ext members."""
    sample: Sample = {"__key__": key}
    text_list = _field(doc, "text_list", list, where)
    infos = []
    for j, image in enumerate(doc.get("images", [])):
        at = f"{where}: images[{j}]"
        path, index = _field(image, "path", str, at), _field(image, "matched_text_index", int, at)
        if not 0 <= index < len(text_list):
            raise ShardInputError(f"{at}: matched_text_index {index} is outside text_list (length {len(text_list)})")
        name = f"{j}.{_ext(path)}"
        sample[name] = _read(os.path.join(root, path), f"{at}.path")
        infos.append({"matched_text_index": index, "image_name": name})
    sample["json"] = json.dumps({"text_list": text_list, "image_info": infos}).encode()
    return sample


def storyboard_sample(key: str, doc: dict, root: str, where: str) -> Sample:
    """A YT-Storyboard-style document -> {i}.jpg|png frames, {i}.txt subtitles, json timestamps."""
    sample: Sample = {"__key__": key}
    times = []
    for i, frame in enumerate(_field(doc, "frames", list, where)):
        at = f"{where}: frames[{i}]"
        path = _field(frame, "path", str, at)
        times.append(_number(frame, "time", at))
        sample[f"{i}.{_ext(path)}"] = _read(os.path.join(root, path), f"{at}.path")
    spans = []
    for i, sub in enumerate(doc.get("subtitles", [])):
        at = f"{where}: subtitles[{i}]"
        sample[f"{i}.txt"] = _field(sub, "text", str, at).encode()
        spans.append([_number(sub, "start", at), _number(sub, "end", at)])
    sample["json"] = json.dumps({"frame_timestamps": times, "subtitle_timestamps": spans}).encode()
    return sample


def _number(doc: dict, name: str, where: str) -> float:
    if not isinstance(doc.get(name), (int, float)) or isinstance(doc.get(name), bool):
        raise ShardInputError(f"{where}: field {name!r} must be a number, got {doc.get(name, 'nothing')!r}")
    return float(doc[name])


def chat_sample(key: str, record: dict, root: str, where: str) -> Sample:
    """A LLaVA / ShareGPT record -> json (the record, its media renamed to the members) + {j}.ext
    images + video{j}.ext videos."""
    if not isinstance(record.get("conversations", record.get("messages")), list):
        raise ShardInputError(f"{where}: needs a `conversations` (or `messages`) list")
    sample: Sample = {"__key__": key}
    meta = {k: v for k, v in record.items() if k not in ("image", "video")}
    for field_name, prefix, listed in (("image", "", "images"), ("video", "video", "videos")):
        try:
            paths = media_list(record, field_name)
        except SampleError as e:
            raise ShardInputError(f"{where}: {e.message}") from None
        meta[listed] = [f"{prefix}{j}.{_ext(p)}" for j, p in enumerate(paths)]
        for name, path in zip(meta[listed], paths):
            sample[name] = _read(os.path.join(root, path), f"{where}: {field_name} {path}")
    sample["json"] = json.dumps(meta).encode()
    return sample


def chat_samples(path: str, image_root: str = "", records: Optional[List[Tuple[int, dict]]] = None
                 ) -> Tuple[str, Iterator[Sample]]:
    """("chat", samples) for a .json list or a .jsonl of chat records (`records`: the .jsonl's, when
    already read by `_jsonl_records`)."""
    if path.endswith(".json"):
        try:
            with open(path) as f:
                records = json.load(f)
        except OSError as e:
            raise ShardInputError(f"{path}: cannot read ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise ShardInputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ShardInputError(f"{path}: expected a JSON list of records (LLaVA-Instruct / ShareGPT layout)")
        numbered = [(f"record {i}", r) for i, r in enumerate(records)]
    else:
        numbered = [(f"line {n}", r) for n, r in (_jsonl_records(path) if records is None else records)]
    if not numbered:
        raise ShardInputError(f"{path}: no records")
    root = image_root or os.path.dirname(os.path.abspath(path))
    return "chat", (chat_sample(f"{i:06d}", r, root, f"{path} {at}") for i, (at, r) in enumerate(numbered))


def _jsonl_records(path: str) -> List[Tuple[int, dict]]:
    """[(line number, object)] of a jsonl file; ShardInputError for a line that is not a JSON object."""
    try:
        with open(path) as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise ShardInputError(f"{path}: cannot read ({e.strerror or e}); expected a folder or a .jsonl") from None
    docs = []
    for n, line in lines:
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise ShardInputError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(doc, dict):
            raise ShardInputError(f"{path} line {n}: expected a JSON object, got {type(doc).__name__}")
        docs.append((n, doc))
    return docs


def jsonl_samples(path: str, records: Optional[List[Tuple[int, dict]]] = None) -> Tuple[str, Iterator[Sample]]:
    """(kind, samples) for a jsonl of interleaved or storyboard documents (one kind per file, set by
    the first document: text_list -> interleaved, frames -> video_interleaved); `records`: its records
    when already read by `_jsonl_records`."""
    docs = _jsonl_records(path) if records is None else records
    if not docs:
        raise ShardInputError(f"{path}: no documents")
    first = docs[0][1]
    if "text_list" not in first and "frames" not in first:
        raise ShardInputError(f"{path} line {docs[0][0]}: neither 'text_list' (interleaved) nor 'frames' "
                              "(video_interleaved); see --help for the fields")
    kind = "interleaved" if "text_list" in first else "video_interleaved"
    make = interleaved_sample if kind == "interleaved" else storyboard_sample
    root = os.path.dirname(os.path.abspath(path))
    return kind, (make(f"{i:06d}", doc, root, f"{path} line {n}") for i, (n, doc) in enumerate(docs))


def _holds_chat(records: List[Tuple[int, dict]]) -> bool:
    """Whether a .jsonl's first record has `conversations` or `messages` (a chat file)."""
    return bool(records) and ("conversations" in records[0][1] or "messages" in records[0][1])


def write_shards(samples: Iterator[Sample], pattern: str, max_samples: int) -> List[str]:
    """Write samples to pattern % 0, pattern % 1, ... (at most max_samples each); returns the paths.
    If reading a sample fails, the shards written so far are removed and the error re-raised."""
    import webdataset as wds

    if max_samples < 1:
        raise ShardInputError("--max-samples must be >= 1")
    paths: List[str] = []
    writer, count = None, 0
    try:
        for sample in samples:
            if writer is None or count == max_samples:
                if writer is not None:
                    writer.close()
                paths.append(pattern % len(paths))
                os.makedirs(os.path.dirname(os.path.abspath(paths[-1])), exist_ok=True)
                writer, count = wds.TarWriter(paths[-1], encoder=False, mtime=0.0), 0
            writer.write(sample)
            count += 1
    except BaseException:
        if writer is not None:
            writer.close()
        for path in paths:
            os.remove(path)
        raise
    if writer is not None:
        writer.close()
    return paths


def main(argv=None) -> List[str]:
    """Make shards; returns their paths. Raises ShardInputError for unusable input."""
    parser = argparse.ArgumentParser(prog="python -m emu_mc.data.make_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a folder of captioned images/videos, or a .jsonl of documents")
    parser.add_argument("out", help="output pattern with one %%d field, e.g. out/laion-%%06d.tar")
    parser.add_argument("--max-samples", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--format", choices=["auto", "llava", "sharegpt"], default="auto",
                        help="llava / sharegpt: a .json list or .jsonl of chat records (both read the same "
                             "way) -> chat shards; auto: by the folder / file and its first record")
    parser.add_argument("--image-root", default="", help="chat records' media paths are relative to this "
                                                         "folder (default: the file's folder)")
    args = parser.parse_args(argv)
    if "%" not in args.out:
        parser.error("out needs a %d field (e.g. out/laion-%06d.tar)")
    if os.path.isdir(args.source):
        kind, samples = folder_samples(args.source)
    elif args.source.endswith(".json"):
        kind, samples = chat_samples(args.source, args.image_root)
    else:
        records = _jsonl_records(args.source)
        if args.format != "auto" or _holds_chat(records):
            kind, samples = chat_samples(args.source, args.image_root, records)
        else:
            kind, samples = jsonl_samples(args.source, records)
    paths = write_shards(samples, args.out, args.max_samples)
    print(f"{kind}: wrote {len(paths)} shard(s): {', '.join(paths)}")
    return paths


def cli(argv=None) -> int:
    """The command line: 0, or 2 with one line on stderr for unusable input."""
    try:
        main(argv)
    except ShardInputError as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(cli())
