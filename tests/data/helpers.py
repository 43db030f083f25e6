"""Helpers for the data tests: small photos, encoded videos (PyAV, no ffmpeg binary), shards written
with webdataset's TarWriter, and batches split back into documents."""
import io
import os
from functools import lru_cache
from typing import Dict, List, Tuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from emu_mc.data.decode import normalize_uint8, resize_uint8

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina")


@lru_cache(maxsize=None)
def photo(name: str, width: int = 48, height: int = 40) -> np.ndarray:
    """A scikit-image sample photo as uint8 [height, width, 3]."""
    import skimage.data

    img = getattr(skimage.data, name)()
    return np.asarray(Image.fromarray(img[..., :3]).resize((width, height), Image.BICUBIC))


def encode_image(pixels: np.ndarray, fmt: str = "jpeg") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 90} if fmt == "jpeg" else {}))
    return buf.getvalue()


def encode_video(frames: np.ndarray, container: str = "webm", fps: int = 10) -> bytes:
    """uint8 [F, H, W, 3] -> VP9 .webm or H.264 .mp4 bytes, encoded with PyAV."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream("libvpx-vp9" if container == "webm" else "libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "20"} if container == "mp4" else {"crf": "20", "b": "0"}
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def pan_frames(name: str, count: int = 9) -> np.ndarray:
    """uint8 [count, 32, 48, 3]: a window sliding across a photo, so frames differ."""
    big = photo(name, 96, 32)
    return np.stack([big[:, x:x + 48] for x in np.linspace(0, 48, count).astype(int)])


def write_shard(path, samples: List[Dict]) -> str:
    """samples: dicts with "__key__" and ext -> bytes|str; written as they are."""
    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as writer:
        for sample in samples:
            writer.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()})
    return str(path)


def expected_pixels(pixels: np.ndarray, size: int) -> torch.Tensor:
    """What every decoder should produce for RGB uint8 [..., H, W, 3]: float32 [..., 3, size, size]."""
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    return normalize_uint8(np.stack([resize_uint8(p, size) for p in flat])).reshape(*pixels.shape[:-3], 3, size, size)


def documents(batch, img_begin: int) -> List[Tuple[List[int], torch.Tensor]]:
    """Split a Batch back into (tokens, images [n, 3, S, S]) per document, in order."""
    out, at = [], 0
    for row, seg in zip(batch.input_ids.tolist(), batch.segment_ids.tolist()):
        for d in range(max(seg) + 1):
            tokens = [t for t, s in zip(row, seg) if s == d]
            n = tokens.count(img_begin)
            out.append((tokens, batch.images[at:at + n]))
            at += n
    assert at == batch.images.shape[0]
    return out
