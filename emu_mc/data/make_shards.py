"""Write WebDataset shards the loader reads (layouts: emu_mc/data/sources.py).

    python -m emu_mc.data.make_shards photos/ out/laion-%06d.tar            # image_text
    python -m emu_mc.data.make_shards clips/ out/webvid-%06d.tar            # video_text
    python -m emu_mc.data.make_shards docs.jsonl out/mmc4-%06d.tar          # interleaved
    python -m emu_mc.data.make_shards boards.jsonl out/storyboard-%06d.tar  # video_interleaved

A folder: every image (jpg|jpeg|png|webp) or video (mp4|webm|mkv|mov|avi) with a sidecar caption
`<name>.txt` becomes one sample (files without a caption are skipped with a warning); a folder must
hold images or videos, not both. A jsonl: one document per line, paths relative to the jsonl file:
  interleaved:       {"text_list": [str, ...], "images": [{"path": str, "matched_text_index": int}, ...]}
  video_interleaved: {"frames": [{"path": str, "time": float}, ...],
                      "subtitles": [{"text": str, "start": float, "end": float}, ...]}
Samples go to consecutive shards of at most --max-samples each; files are stored as they are
(no re-encoding) with mtime 0, so the same input gives byte-identical shards.
"""
import argparse
import json
import logging
import os
from typing import Dict, Iterator, List, Tuple

from emu_mc.data.sources import IMAGE_EXTS, VIDEO_EXTS

log = logging.getLogger("emu_mc.data")
Sample = Dict[str, bytes]  # "__key__" -> key (str), ext -> bytes


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _ext(path: str) -> str:
    return os.path.splitext(path)[1][1:].lower()


def folder_samples(folder: str) -> Tuple[str, Iterator[Sample]]:
    """(kind, samples) for a folder of captioned images or videos, in file-name order."""
    names = sorted(os.listdir(folder))
    media = [n for n in names if _ext(n) in IMAGE_EXTS + VIDEO_EXTS]
    kinds = {"image_text" if _ext(n) in IMAGE_EXTS else "video_text" for n in media}
    if len(kinds) != 1:
        raise ValueError(f"{folder}: expected images or videos (not both, not none); found {len(media)} media files")

    def samples() -> Iterator[Sample]:
        for name in media:
            stem = os.path.splitext(name)[0]
            caption = os.path.join(folder, stem + ".txt")
            if not os.path.exists(caption):
                log.warning("make_shards: %s has no caption %s.txt; skipped", name, stem)
                continue
            yield {"__key__": stem, _ext(name): _read(os.path.join(folder, name)), "txt": _read(caption)}

    return kinds.pop(), samples()


def interleaved_sample(key: str, doc: dict, root: str) -> Sample:
    """An MMC4-style document (see the module docstring) -> json + {j}.ext members."""
    sample: Sample = {"__key__": key}
    infos = []
    for j, image in enumerate(doc.get("images", [])):
        name = f"{j}.{_ext(image['path'])}"
        sample[name] = _read(os.path.join(root, image["path"]))
        infos.append({"matched_text_index": image["matched_text_index"], "image_name": name})
    sample["json"] = json.dumps({"text_list": doc["text_list"], "image_info": infos}).encode()
    return sample


def storyboard_sample(key: str, doc: dict, root: str) -> Sample:
    """A YT-Storyboard-style document -> {i}.jpg|png frames, {i}.txt subtitles, json timestamps."""
    sample: Sample = {"__key__": key}
    for i, frame in enumerate(doc["frames"]):
        sample[f"{i}.{_ext(frame['path'])}"] = _read(os.path.join(root, frame["path"]))
    for i, sub in enumerate(doc.get("subtitles", [])):
        sample[f"{i}.txt"] = sub["text"].encode()
    meta = {"frame_timestamps": [f["time"] for f in doc["frames"]],
            "subtitle_timestamps": [[s["start"], s["end"]] for s in doc.get("subtitles", [])]}
    sample["json"] = json.dumps(meta).encode()
    return sample


def jsonl_samples(path: str) -> Tuple[str, Iterator[Sample]]:
    """(kind, samples) for a jsonl of interleaved or storyboard documents (one kind per file)."""
    with open(path) as f:
        docs = [json.loads(line) for line in f if line.strip()]
    if not docs:
        raise ValueError(f"{path}: no documents")
    kind = "interleaved" if "text_list" in docs[0] else "video_interleaved"
    make = interleaved_sample if kind == "interleaved" else storyboard_sample
    root = os.path.dirname(os.path.abspath(path))
    return kind, (make(f"{i:06d}", doc, root) for i, doc in enumerate(docs))


def write_shards(samples: Iterator[Sample], pattern: str, max_samples: int) -> List[str]:
    """Write samples to pattern % 0, pattern % 1, ... (at most max_samples each); returns the paths."""
    import webdataset as wds

    if max_samples < 1:
        raise ValueError("--max-samples must be >= 1")
    paths: List[str] = []
    writer, count = None, 0
    for sample in samples:
        if writer is None or count == max_samples:
            if writer is not None:
                writer.close()
            paths.append(pattern % len(paths))
            os.makedirs(os.path.dirname(os.path.abspath(paths[-1])), exist_ok=True)
            writer, count = wds.TarWriter(paths[-1], encoder=False, mtime=0.0), 0
        writer.write(sample)
        count += 1
    if writer is not None:
        writer.close()
    return paths


def main(argv=None) -> List[str]:
    parser = argparse.ArgumentParser(prog="python -m emu_mc.data.make_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a folder of captioned images/videos, or a .jsonl of documents")
    parser.add_argument("out", help="output pattern with one %%d field, e.g. out/laion-%%06d.tar")
    parser.add_argument("--max-samples", type=int, default=1000, help="samples per shard (default 1000)")
    args = parser.parse_args(argv)
    if "%" not in args.out:
        parser.error("out needs a %d field (e.g. out/laion-%06d.tar)")
    kind, samples = folder_samples(args.source) if os.path.isdir(args.source) else jsonl_samples(args.source)
    paths = write_shards(samples, args.out, args.max_samples)
    print(f"{kind}: wrote {len(paths)} shard(s): {', '.join(paths)}")
    return paths


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    main()
