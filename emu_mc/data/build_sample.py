"""Build the sample data set in data/sample/ (all four sources) from scikit-image's bundled photos.

    python -m emu_mc.data.build_sample [--out data/sample]

Needs scikit-image (the photos, shipped in its wheel: nothing is downloaded) and the ffmpeg binary
(VP9 and H.264 encoding of short pans and zooms over the photos); the loader needs neither. The
captions and documents below were written for this set. Writes README.md with each photo's license.
"""
import argparse
import json
import os
import shutil
import subprocess
import tempfile

import numpy as np
from PIL import Image

from emu_mc.data.make_shards import folder_samples, jsonl_samples, write_shards

# name in skimage.data -> (file format, caption, license as skimage's docstring states it)
PHOTOS = {
    "astronaut": ("jpg", "A portrait of an astronaut in an orange suit in front of a flag.",
                  "NASA; no known copyright restrictions, released into the public domain"),
    "coffee": ("jpg", "A cup of coffee on a saucer with a spoon, on a wooden table.",
               "CC0 by the photographer (Rachel Michetti), courtesy of Pikolo Espresso Bar"),
    "chelsea": ("jpg", "A tabby cat sitting and looking to the side.",
                "CC0 by the photographer (Stefan van der Walt)"),
    "rocket": ("jpg", "A rocket launching into a clear sky, leaving a long trail of white smoke.",
               "SpaceX, released into the public domain"),
    "hubble_deep_field": ("jpg", "Many small galaxies of different colours on a black sky.",
                          "NASA (HubbleSite); may be freely used in the public domain"),
    "retina": ("webp", "A photograph of the back of a human eye, orange with dark blood vessels.",
               "CC0 1.0 (Mikael Haggstrom, via Wikimedia Commons)"),
    "coins": ("png", "Old greek coins from Pompeii on a grey background.",
              "Brooklyn Museum Collection; no known copyright restrictions"),
    "camera": ("png", "A camera man standing on a street holding an old film camera.",
               "CC0 by the photographer (Lav Varshney)"),
    "brick": ("png", "A close-up of a red brick wall.",
              "CC0 (CC0Textures), perspective-corrected and cropped by scikit-image"),
}

# (photo, motion, container, caption)
CLIPS = [
    ("rocket", "zoom", "webm", "The rocket rises into the sky and the camera moves closer."),
    ("astronaut", "pan", "mp4", "The camera moves slowly across a portrait of an astronaut."),
    ("coffee", "pan", "webm", "A slow pan over a cup of coffee on a wooden table."),
    ("chelsea", "zoom", "mp4", "The camera moves closer to the face of a cat."),
    ("hubble_deep_field", "pan", "webm", "A slow pan over many small galaxies in deep space."),
    ("coins", "zoom", "mp4", "The camera moves closer to old coins on a grey background."),
]

DOCUMENTS = [
    {"text_list": ["A morning in the city begins with coffee.",
                   "The cup is white and the table is made of old wood.",
                   "Later, a cat watches the street from a window."],
     "images": [{"photo": "coffee", "matched_text_index": 1}, {"photo": "chelsea", "matched_text_index": 2}]},
    {"text_list": ["In this document we describe a rocket launch.",
                   "First the rocket stands on the pad. Then it rises, leaving a long trail of white smoke.",
                   "From space, an astronaut can see the blue planet."],
     "images": [{"photo": "rocket", "matched_text_index": 1}, {"photo": "astronaut", "matched_text_index": 2}]},
    {"text_list": ["The history of the city can be read in its old things:",
                   "coins found in the ground,", "walls of red brick,",
                   "and the photographs of a camera man on the street."],
     "images": [{"photo": "coins", "matched_text_index": 1}, {"photo": "brick", "matched_text_index": 2},
                {"photo": "camera", "matched_text_index": 3}]},
    {"text_list": ["Question: what is in the picture?", "Answer: many small galaxies on a black sky."],
     "images": [{"photo": "hubble_deep_field", "matched_text_index": 0}]},
]

# (clip index in CLIPS, subtitles as (start, end, text)); frames are taken every 0.5 s.
STORYBOARDS = [
    (0, [(0.0, 0.2, "The rocket stands on the pad."), (0.2, 0.4, "The rocket stands on the pad."),
         (0.6, 1.4, "Then it rises into the sky.")]),
    (2, [(0.2, 0.6, "Coffee in the morning light."), (1.1, 1.4, "The next frame shows the same scene.")]),
    (3, [(0.0, 0.5, "A cat sits on the table."), (0.5, 1.0, "It looks to the side,"),
         (1.0, 1.4, "closer to the camera.")]),
]

VIDEO_SIZE = (96, 72)  # width, height (even: yuv420p)
FPS, NUM_FRAMES = 10, 15
MAX_SIDE = 160


def load_photo(name: str) -> np.ndarray:
    """A skimage photo as uint8 [H, W, 3] (grey photos repeated to RGB)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]


def clip_frames(photo: np.ndarray, motion: str) -> np.ndarray:
    """uint8 [NUM_FRAMES, h, w, 3]: a window panning left to right, or zooming in, over the photo."""
    h, w = photo.shape[:2]
    aspect = VIDEO_SIZE[0] / VIDEO_SIZE[1]
    frames = []
    for t in np.linspace(0.0, 1.0, NUM_FRAMES):
        if motion == "pan":
            ch = int(h * 0.7)
            cw = min(w, int(ch * aspect))
            x, y = int((w - cw) * t), (h - ch) // 2
        else:
            ch = int(h * (1.0 - 0.5 * t))
            cw = min(w, int(ch * aspect))
            x, y = (w - cw) // 2, (h - ch) // 2
        crop = Image.fromarray(photo[y:y + ch, x:x + cw]).resize(VIDEO_SIZE, Image.BICUBIC)
        frames.append(np.asarray(crop))
    return np.stack(frames)


def encode_video(frames: np.ndarray, path: str) -> None:
    """uint8 [F, H, W, 3] -> a VP9 .webm or H.264 .mp4 file at FPS, with the ffmpeg binary."""
    codec = (["-c:v", "libvpx-vp9", "-crf", "40", "-b:v", "0", "-deadline", "good", "-cpu-used", "4"]
             if path.endswith(".webm") else ["-c:v", "libx264", "-crf", "28", "-preset", "medium"])
    f, h, w, _ = frames.shape
    cmd = ["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
           "-r", str(FPS), "-i", "-", *codec, "-pix_fmt", "yuv420p", "-threads", "1",
           "-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1", path]
    subprocess.run(cmd, input=frames.tobytes(), check=True)


def save_photo(photo: np.ndarray, path: str) -> None:
    img = Image.fromarray(photo)
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.BICUBIC)
    if path.endswith(".png") and np.all(photo[..., 0] == photo[..., 1]):
        img = img.convert("L")  # grey photos stay one-channel: the decoders must expand them
    img.save(path, quality=85) if not path.endswith(".png") else img.save(path, optimize=True)


def stage(tmp: str) -> dict:
    """Write the raw material (photos + captions, clips + captions, two jsonl files) under tmp."""
    dirs = {k: os.path.join(tmp, k) for k in ("photos", "clips", "docs")}
    for d in dirs.values():
        os.makedirs(d)
    for name, (fmt, caption, _) in PHOTOS.items():
        save_photo(load_photo(name), os.path.join(dirs["photos"], f"{name}.{fmt}"))
        with open(os.path.join(dirs["photos"], f"{name}.txt"), "w") as f:
            f.write(caption)
    boards = {}
    for i, (name, motion, container, caption) in enumerate(CLIPS):
        frames = clip_frames(load_photo(name), motion)
        stem = f"{i:02d}_{name}_{motion}"
        encode_video(frames, os.path.join(dirs["clips"], f"{stem}.{container}"))
        with open(os.path.join(dirs["clips"], f"{stem}.txt"), "w") as f:
            f.write(caption)
        boards[i] = frames
    with open(os.path.join(dirs["docs"], "interleaved.jsonl"), "w") as f:
        for doc in DOCUMENTS:
            images = [{"path": f"../photos/{im['photo']}.{PHOTOS[im['photo']][0]}",
                       "matched_text_index": im["matched_text_index"]} for im in doc["images"]]
            f.write(json.dumps({"text_list": doc["text_list"], "images": images}) + "\n")
    with open(os.path.join(dirs["docs"], "storyboard.jsonl"), "w") as f:
        for b, (clip, subs) in enumerate(STORYBOARDS):
            frames = []
            for k, index in enumerate(range(0, NUM_FRAMES, FPS // 2)):
                path = os.path.join(dirs["docs"], f"board{b}_{k}.jpg")
                Image.fromarray(boards[clip][index]).save(path, quality=85)
                frames.append({"path": os.path.basename(path), "time": index / FPS})
            subtitles = [{"start": s, "end": e, "text": t} for s, e, t in subs]
            f.write(json.dumps({"frames": frames, "subtitles": subtitles}) + "\n")
    return dirs


def write_readme(out: str, shards: dict) -> None:
    rows = "\n".join(f"| {name} | {fmt} | {lic} |" for name, (fmt, _, lic) in PHOTOS.items())
    listing = "\n".join(f"- `{kind}`: " + ", ".join(f"`{os.path.relpath(p, out)}`" for p in paths)
                        for kind, paths in shards.items())
    text = f"""# Sample data set

Built by `python -m emu_mc.data.build_sample` (needs scikit-image and the ffmpeg binary; re-running
it rewrites this folder). WebDataset shards of all four sources the loader reads
(layouts: `emu_mc/data/sources.py`):

{listing}

- image_text: each photo below (longest side {MAX_SIDE} px) with a caption.
- interleaved: {len(DOCUMENTS)} short documents written for this set, 1-3 photos each.
- video_text: {len(CLIPS)} clips of {NUM_FRAMES} frames at {FPS} fps, {VIDEO_SIZE[0]}x{VIDEO_SIZE[1]}: slow pans and
  zooms over the photos, VP9 in .webm and H.264 in .mp4, each with a caption.
- video_interleaved: {len(STORYBOARDS)} storyboards (a frame every 0.5 s of a clip, as jpg) with timed
  subtitles, some adjacent (the loader merges them) and one repeated (the loader drops the repeat).

Captions, documents and subtitles were written for this repository (Apache-2.0, as the code).

## Photos

All from scikit-image's bundled sample data (`skimage.data`); licenses as scikit-image's docstrings
state them.

| skimage.data | stored as | license |
|---|---|---|
{rows}
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


def build(out: str) -> dict:
    """Write the four sources' shards and README.md under `out`; returns kind -> shard paths."""
    if shutil.which("ffmpeg") is None:
        raise SystemExit("build_sample needs the ffmpeg binary (apt-get install ffmpeg)")
    prefixes = {"image_text": ("laion", 5), "interleaved": ("mmc4", 4), "video_text": ("webvid", 3),
                "video_interleaved": ("storyboard", 3)}
    shards = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = stage(tmp)
        inputs = [folder_samples(dirs["photos"]), folder_samples(dirs["clips"]),
                  jsonl_samples(os.path.join(dirs["docs"], "interleaved.jsonl")),
                  jsonl_samples(os.path.join(dirs["docs"], "storyboard.jsonl"))]
        for kind, samples in inputs:
            prefix, per_shard = prefixes[kind]
            folder = os.path.join(out, kind)
            shutil.rmtree(folder, ignore_errors=True)
            shards[kind] = write_shards(samples, os.path.join(folder, prefix + "-%06d.tar"), per_shard)
    write_readme(out, shards)
    return shards


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/sample", help="output folder (default data/sample)")
    for kind, paths in build(parser.parse_args().out).items():
        print(kind, paths)
