"""Image and video decoding to CLIP-normalised tensors, by one of three interchangeable paths.

- `CpuDecoder`: PIL for images, PyAV (FFmpeg) for video. The CPU default.
- `DaliDecoder(device="cpu")`: DALI's CPU operators (libjpeg-turbo; FFmpeg for VP8/VP9/MJPEG video).
  DALI's CPU video decoder refuses H.264 and MPEG-4, which go through PyAV instead.
- `DaliDecoder(device="gpu")`: nvJPEG and NVDEC, resize and normalisation on the GPU.

All paths produce the same thing: the image resized to image_size x image_size with bicubic
interpolation (no crop), scaled to [0, 1], normalised with the CLIP mean/std, float32 CHW. They differ
by resampling filters and YUV->RGB conversion: on average 1-2 uint8 levels, at single pixels up to ~10
levels on images and ~40 on video (chroma edges); tests/data/test_decode.py holds these bounds.
Video frames are picked uniformly with `uniform_frame_indices` (docs/model.md: the released Emu-1 inference
samples 8 frames uniformly). A DALI failure on one input (e.g. a corrupt JPEG, which stops a DALI
pipeline) rebuilds that thread's pipeline and retries the input with PIL/PyAV, so nothing is lost and a
bad input is reported, never raised past the sample.
"""
import io
import logging
import os
import threading
import weakref
from collections import Counter
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch

from emu_mc.data.errors import CORRUPT_IMAGE, CORRUPT_VIDEO, SampleError

log = logging.getLogger("emu_mc.data")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DALI_CPU_VIDEO_CODECS = ("vp8", "vp9", "mjpeg")  # what DALI's CPU video decoder accepts (PLATFORM.md)
ImageResult = Union[torch.Tensor, SampleError]


def uniform_frame_indices(num_frames: int, n: int) -> List[int]:
    """n frame indices spread over a clip of num_frames: the middle of n equal segments of
    [0, num_frames - 1] (the `get_index` rule of VideoChat-style video code). Repeats frames when the
    clip is shorter than n."""
    seg = float(num_frames - 1) / n
    start = int(seg / 2)
    return [min(num_frames - 1, start + int(np.round(seg * i))) for i in range(n)]


def normalize_uint8(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] (RGB) -> float32 [..., 3, H, W], (x / 255 - mean) / std."""
    t = torch.tensor(np.asarray(pixels)).movedim(-1, -3).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return t.sub_(mean).div_(std)


def resize_uint8(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3], PIL bicubic (antialiased when shrinking)."""
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC))


# --------------------------------------------------------------------------- PIL / PyAV


def pil_decode(blob: bytes, size: int) -> torch.Tensor:
    """Encoded image bytes -> float32 [3, size, size]. Raises SampleError(corrupt_image)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()  # decodes fully: truncated data raises here
            rgb = img.convert("RGB").resize((size, size), Image.BICUBIC)
        return normalize_uint8(np.asarray(rgb))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise SampleError(CORRUPT_IMAGE, f"PIL cannot decode the image ({len(blob)} bytes): {type(e).__name__}: {e}") from None


def probe_video(blob: bytes) -> Tuple[str, int]:
    """(codec name, number of frames) of the first video stream, by demuxing (no decoding)."""
    import av

    try:
        with av.open(io.BytesIO(blob), mode="r") as container:
            if not container.streams.video:
                raise SampleError(CORRUPT_VIDEO, "no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except SampleError:
        raise
    except Exception as e:
        raise SampleError(CORRUPT_VIDEO, f"cannot open the video ({len(blob)} bytes): {type(e).__name__}: {e}") from None
    if count == 0:
        raise SampleError(CORRUPT_VIDEO, f"{codec} video without frames")
    return codec, count


def pyav_frames(blob: bytes, indices: Sequence[int]) -> Tuple[List[np.ndarray], int]:
    """Decode the frames at `indices` (uint8 [H, W, 3] each, in the order asked) with PyAV.

    Returns (frames, frames decoded); frames is empty when the stream ends before the last index
    (the caller re-plans with the real count). Raises SampleError(corrupt_video)."""
    import av

    wanted = set(indices)
    last = max(indices)
    got = {}
    decoded = 0
    try:
        with av.open(io.BytesIO(blob), mode="r") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except Exception as e:
        if not got and decoded == 0:
            raise SampleError(CORRUPT_VIDEO, f"PyAV cannot decode the video: {type(e).__name__}: {e}") from None
        # A stream that breaks part way: use what decoded (the caller re-plans if frames are missing).
    if decoded == 0:
        raise SampleError(CORRUPT_VIDEO, "PyAV decoded no frame")
    if any(i not in got for i in wanted):
        return [], decoded
    return [got[i] for i in indices], decoded


def pyav_video(blob: bytes, num_frames: int, size: int, count: int) -> torch.Tensor:
    """Encoded video -> float32 [num_frames, 3, size, size] (uniformly sampled frames), via PyAV."""
    frames, decoded = pyav_frames(blob, uniform_frame_indices(count, num_frames))
    if not frames:  # fewer frames than the container announced: sample the ones that exist
        frames, _ = pyav_frames(blob, uniform_frame_indices(decoded, num_frames))
        if not frames:
            raise SampleError(CORRUPT_VIDEO, f"frame count unstable ({count} announced, {decoded} decoded)")
    return normalize_uint8(np.stack([resize_uint8(f, size) for f in frames]))


class CpuDecoder:
    """PIL for images, PyAV for video. Thread-safe."""

    name = "cpu"

    def __init__(self, image_size: int):
        self.size = image_size

    def describe(self) -> str:
        return "CPU: images via PIL, video via PyAV (FFmpeg)"

    def images(self, blobs: Sequence[bytes]) -> Tuple[List[ImageResult], Counter]:
        """Encoded images -> one float32 [3, S, S] tensor or SampleError each; and decode-path counts."""
        out: List[ImageResult] = []
        for blob in blobs:
            try:
                out.append(pil_decode(blob, self.size))
            except SampleError as e:
                out.append(e)
        return out, Counter({"image:pil": len(blobs)})

    def video(self, blob: bytes, num_frames: int) -> Tuple[torch.Tensor, str]:
        """Encoded video -> (float32 [num_frames, 3, S, S], decode path). Raises SampleError."""
        _, count = probe_video(blob)
        return pyav_video(blob, num_frames, self.size, count), "video:pyav"


# --------------------------------------------------------------------------- DALI


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


# A DALI pipeline finalized in a forked child waits forever for its worker threads, which the child
# does not have; and a fork (megatron-core's checkpoint writer forks) frees the other threads' state,
# so the decode threads' thread-local pipelines would be finalized there. Every pipeline alive at a
# fork is held in this list across it: the child never lets go of them, the parent does after.
_PIPELINES: "weakref.WeakSet" = weakref.WeakSet()
_HELD_ACROSS_FORK: list = []


def _hold_pipelines() -> None:
    _HELD_ACROSS_FORK.extend(_PIPELINES)


os.register_at_fork(before=_hold_pipelines, after_in_parent=_HELD_ACROSS_FORK.clear)


class DaliDecoder:
    """DALI pipelines (one pair per thread), fed through external_source, one call per document.

    device "cpu": CPU operators. device "gpu": decoders in "mixed" mode (nvJPEG / NVDEC), resize
    and normalise on the GPU; outputs are copied back to host tensors like the other paths'.
    """

    MAX_BATCH = 16

    def __init__(self, image_size: int, device: str = "cpu"):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"DaliDecoder device must be cpu or gpu, not {device!r}")
        if not dali_available():
            raise RuntimeError("data.decoder: DALI is not importable; install the extra: pip install -e '.[dali]'")
        self.size = image_size
        self.device = device
        self.name = f"dali_{device}"
        self._local = threading.local()

    def describe(self) -> str:
        if self.device == "gpu":
            return "DALI GPU: images via nvJPEG, video via NVDEC, resize + normalise on the GPU"
        return "DALI CPU: images via DALI (libjpeg-turbo), VP8/VP9/MJPEG video via DALI; H.264/MPEG-4 via PyAV"

    # -- pipelines
    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        decode_device = "mixed" if self.device == "gpu" else "cpu"
        device_id = torch.cuda.current_device() if self.device == "gpu" else None
        mean = [m * 255 for m in CLIP_MEAN]
        std = [s * 255 for s in CLIP_STD]

        def finish(x, layout):
            x = fn.resize(x, resize_x=self.size, resize_y=self.size, interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout=layout, mean=mean, std=std)

        common = dict(num_threads=1, device_id=device_id, prefetch_queue_depth=1, exec_dynamic=True)

        @pipeline_def(batch_size=self.MAX_BATCH, **common)
        def image_pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            return finish(fn.decoders.image(enc, device=decode_device, output_type=types.RGB), "CHW")

        @pipeline_def(batch_size=1, **common)
        def video_pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            return finish(fn.decoders.video(enc, device=decode_device, frames=frames), "FCHW")

        pipes = {"image": image_pipe(), "video": video_pipe()}
        for p in pipes.values():
            p.build()
            _PIPELINES.add(p)
        self._local.pipes = pipes

    def _pipe(self, kind: str):
        if getattr(self._local, "pipes", None) is None:
            self._build()
        return self._local.pipes[kind]

    def _rebuild(self) -> None:
        self._local.pipes = None  # the next call builds fresh pipelines; the old ones are dropped

    def _run(self, kind: str, feeds: dict) -> np.ndarray:
        pipe = self._pipe(kind)
        for name, data in feeds.items():
            pipe.feed_input(name, data)
        (out,) = pipe.run()
        if self.device == "gpu":
            out = out.as_cpu()
        return out.as_array()

    # -- public
    def images(self, blobs: Sequence[bytes]) -> Tuple[List[ImageResult], Counter]:
        """Encoded images -> one float32 [3, S, S] tensor or SampleError each; and decode-path counts."""
        out: List[ImageResult] = []
        paths: Counter = Counter()
        for start in range(0, len(blobs), self.MAX_BATCH):
            chunk = blobs[start:start + self.MAX_BATCH]
            try:
                arr = self._run("image", {"enc": [np.frombuffer(b, np.uint8) for b in chunk]})
                out.extend(torch.from_numpy(a.copy()) for a in arr)
                paths[f"image:{self.name}"] += len(chunk)
                continue
            except Exception as e:  # a bad input stops the pipeline: rebuild, go one by one
                log.debug("DALI image batch failed (%s); retrying one by one", e)
                self._rebuild()
            for blob in chunk:
                try:
                    arr = self._run("image", {"enc": [np.frombuffer(blob, np.uint8)]})
                    out.append(torch.from_numpy(arr[0].copy()))
                    paths[f"image:{self.name}"] += 1
                except Exception:
                    self._rebuild()
                    try:  # formats DALI does not read (e.g. GIF) still decode; corrupt bytes fail here too
                        out.append(pil_decode(blob, self.size))
                        paths["image:pil_fallback"] += 1
                    except SampleError as err:
                        out.append(err)
        return out, paths

    def video(self, blob: bytes, num_frames: int) -> Tuple[torch.Tensor, str]:
        """Encoded video -> (float32 [num_frames, 3, S, S], decode path). Raises SampleError."""
        codec, count = probe_video(blob)
        if self.device == "cpu" and codec not in DALI_CPU_VIDEO_CODECS:
            return pyav_video(blob, num_frames, self.size, count), "video:pyav"
        indices = np.asarray(uniform_frame_indices(count, num_frames), np.int32)
        try:
            arr = self._run("video", {"enc": [np.frombuffer(blob, np.uint8)], "frames": [indices]})
            return torch.from_numpy(arr[0].copy()), f"video:{self.name}"
        except Exception as e:
            self._rebuild()
            log.debug("DALI video decode failed (%s); retrying with PyAV", e)
        return pyav_video(blob, num_frames, self.size, count), "video:pyav_fallback"


def make_decoder(kind: str, image_size: int):
    """data.decoder -> a decoder object with .images(), .video(), .name, .describe()."""
    if kind == "auto":
        kind = "dali_gpu" if torch.cuda.is_available() and dali_available() else "cpu"
    if kind == "cpu":
        return CpuDecoder(image_size)
    if kind == "dali_gpu" and not torch.cuda.is_available():
        raise RuntimeError("data.decoder: dali_gpu needs a CUDA device; use cpu or dali_cpu on this machine")
    return DaliDecoder(image_size, "gpu" if kind == "dali_gpu" else "cpu")
