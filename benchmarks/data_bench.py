"""Data decoding benchmark: PyAV / PIL beside DALI (CPU, and GPU when CUDA exists) on the same files.

    python benchmarks/data_bench.py                  # 1 thread and --workers threads (default: all cores)
    python benchmarks/data_bench.py --reps 5 --update-results   # rewrite the committed benchmarks/results/

Files: the sample set's clips (data/sample/video_text: 96x72, 15 frames; VP9 .webm and H.264 .mp4) and
images (data/sample/image_text), plus two clips generated here with PyAV (320x240, 48 frames, a pan
over a photo; VP9 and H.264) and a 512x512 JPEG.
Tasks:
  decode_all   every frame of each clip to RGB uint8 (raw decoder speed): pyav, dali_cpu (VP9 only:
               DALI's CPU decoder refuses H.264), dali_gpu (NVDEC), torchcodec / decord if importable
  video_8x224  what the loader does per video_text sample: 8 uniformly sampled frames, resized to
               224x224, CLIP-normalised (emu_mc.data.decode: cpu = PyAV, dali_cpu, dali_gpu)
  image_224    one image decoded, resized to 224x224, normalised (cpu = PIL, dali_cpu, dali_gpu)
Reported: decoded frames/s (frames handed out), samples/s (clips or images), with 1 thread and with
--workers threads (each with its own DALI pipelines), median of --reps passes over the files.
"""
import argparse
import io
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from emu_mc.data.decode import CpuDecoder, DaliDecoder, dali_available
from emu_mc.data.shards import expand_shards, index_shard, read_sample
from emu_mc.data.sources import IMAGE_EXTS, VIDEO_EXTS

from bench_common import add_output_args, device_name, save_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample_files(pattern, exts):
    """(ext, bytes) of every member with one of `exts` in the shards matching `pattern`."""
    out = []
    for path in expand_shards(pattern):
        for ref in index_shard(path).samples:
            out += [(ext, blob) for ext, blob in read_sample(path, ref).items() if ext in exts]
    return out


def generated_clips():
    """(ext, bytes) of a 320x240, 48-frame pan over a photo, as VP9 .webm and H.264 .mp4 (PyAV)."""
    import av
    import skimage.data
    from PIL import Image

    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((640, 240)))
    frames = [np.ascontiguousarray(photo[:, x:x + 320]) for x in np.linspace(0, 320, 48).astype(int)]
    clips = []
    for ext, codec in (("webm", "libvpx-vp9"), ("mp4", "libx264")):
        buf = io.BytesIO()
        with av.open(buf, mode="w", format=ext) as out:
            stream = out.add_stream(codec, rate=24)
            stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
            for f in frames:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            out.mux(stream.encode())
        clips.append((ext, buf.getvalue()))
    return clips


# --------------------------------------------------------------------------- raw decoders (all frames)


def pyav_all(blob):
    import av

    with av.open(io.BytesIO(blob)) as c:
        return sum(1 for f in c.decode(video=0) if f.to_ndarray(format="rgb24") is not None)


class DaliAll:
    """fn.decoders.video over the whole clip, one pipeline per thread."""

    def __init__(self, device):
        self.device = device
        self.local = threading.local()

    def __call__(self, blob):
        if not hasattr(self.local, "pipe"):
            from nvidia.dali import fn, pipeline_def, types

            @pipeline_def(batch_size=1, num_threads=1, device_id=0 if self.device == "gpu" else None,
                          prefetch_queue_depth=1, exec_dynamic=True)
            def pipe():
                enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
                return fn.decoders.video(enc, device="mixed" if self.device == "gpu" else "cpu")

            self.local.pipe = pipe()
            self.local.pipe.build()
        self.local.pipe.feed_input("enc", [np.frombuffer(blob, np.uint8)])
        (out,) = self.local.pipe.run()
        if self.device == "gpu":
            out = out.as_cpu()
        return out.as_array()[0].shape[0]


def torchcodec_all(blob):
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(blob)
    return decoder[:].shape[0]


def decord_all(blob):
    import decord

    vr = decord.VideoReader(io.BytesIO(blob))
    return vr.get_batch(list(range(len(vr)))).shape[0]


def importable(name):
    try:
        __import__(name)
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------- timing


def timed(fn, items, threads, reps):
    """Median seconds of one pass of fn over items with `threads` threads, and the frames it returned."""
    def one_pass(pool):
        t0 = time.perf_counter()
        frames = sum(pool.map(fn, items)) if pool else sum(map(fn, items))
        return time.perf_counter() - t0, frames

    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    one_pass(pool)  # warm-up: builds DALI pipelines, loads codecs
    runs = [one_pass(pool) for _ in range(reps)]
    if pool:
        pool.shutdown()
    return statistics.median(r[0] for r in runs), runs[0][1]


def cases(cuda):
    """(task, decoder name, function(blob) -> frames, which file sets it takes)."""
    cpu = CpuDecoder(224)
    out = [("decode_all", "pyav", pyav_all, "video")]
    video = [("video_8x224", "cpu (pyav)", lambda b: cpu.video(b, 8)[0].shape[0], "video")]
    image = [("image_224", "cpu (pil)", lambda b: len(cpu.images([b])[0]), "image")]
    if importable("torchcodec"):
        out.append(("decode_all", "torchcodec", torchcodec_all, "video"))
    if importable("decord"):
        out.append(("decode_all", "decord", decord_all, "video"))
    devices = (["cpu"] + (["gpu"] if cuda else [])) if dali_available() else []
    for device in devices:
        dali = DaliDecoder(224, device)
        out.append(("decode_all", f"dali_{device}", DaliAll(device), "video" if device == "gpu" else "vp9"))
        video.append(("video_8x224", f"dali_{device}", lambda b, d=dali: d.video(b, 8)[0].shape[0], "video"))
        image.append(("image_224", f"dali_{device}", lambda b, d=dali: len(d.images([b])[0]), "image"))
    return out + video + image


def format_table(rows):
    head = f"{'task':<12} {'decoder':<12} {'files':<14} {'thr':>3} {'items':>5} {'ms/pass':>9} {'frames/s':>10} {'samples/s':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['task']:<12} {r['decoder']:<12} {r['files']:<14} {r['threads']:>3} {r['items']:>5} "
                     f"{r['seconds'] * 1e3:>9.1f} {r['frames_per_s']:>10.0f} {r['samples_per_s']:>10.1f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", default=os.path.join(ROOT, "data", "sample"), help="sample set folder")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="threads for the parallel rows")
    parser.add_argument("--reps", type=int, default=3, help="timed passes per row (median reported)")
    add_output_args(parser, "data")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    torch.set_num_threads(1)  # normalisation math stays in the calling thread, as in the loader's workers
    clips = sample_files(os.path.join(args.sample, "video_text", "*.tar"), VIDEO_EXTS)
    images = sample_files(os.path.join(args.sample, "image_text", "*.tar"), IMAGE_EXTS)
    big = generated_clips()
    from PIL import Image
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="jpeg", quality=90)
    file_sets = {
        "video": [("sample webm", [b for e, b in clips if e == "webm"]), ("sample mp4", [b for e, b in clips if e == "mp4"]),
                  ("320x240 webm", [big[0][1]] * 4), ("320x240 mp4", [big[1][1]] * 4)],
        "image": [("sample images", [b for _, b in images]), ("512 jpeg", [buf.getvalue()] * 8)],
    }
    file_sets["vp9"] = [fs for fs in file_sets["video"] if "webm" in fs[0]]
    notes = [f"{device_name()}; median of {args.reps} passes; threads 1 and {args.workers}"]
    skipped = [n for n in ("torchcodec", "decord") if not importable(n)]
    if skipped:
        notes.append(f"not importable, not run: {', '.join(skipped)}")
    if not dali_available():
        notes.append("DALI not importable: dali rows not run")
    if not cuda:
        notes.append("no CUDA: dali_gpu rows not run; H.264 on dali_cpu goes through PyAV (DALI CPU refuses it)")
    print("\n".join(notes))
    rows = []
    for task, name, fn, kind in cases(cuda):
        for files, items in file_sets[kind]:
            for threads in sorted({1, args.workers}):
                seconds, frames = timed(fn, items, threads, args.reps)
                rows.append({"task": task, "decoder": name, "files": files, "threads": threads, "items": len(items),
                             "seconds": seconds, "frames": frames, "frames_per_s": frames / seconds,
                             "samples_per_s": len(items) / seconds})
                print(format_table(rows[-1:]).split("\n", 2)[-1], flush=True)
    table = format_table(rows)
    print("\n" + table)
    import av
    versions = {"torch": torch.__version__, "av": av.__version__, "numpy": np.__version__}
    if dali_available():
        import nvidia.dali
        versions["nvidia-dali"] = nvidia.dali.__version__
    save_results("data", {"versions": versions, "python": platform.python_version(), "notes": notes, "rows": rows},
                 notes, table, args.out)


if __name__ == "__main__":
    main()
