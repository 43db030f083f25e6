"""Decoder paths: DALI CPU agrees with PIL / PyAV within a few pixel levels; DALI survives corrupt
input (PLATFORM.md: one corrupt JPEG stops a DALI pipeline); frame sampling; path selection."""
import os

import numpy as np
import pytest
import torch

from emu_mc.data.decode import (CLIP_STD, CpuDecoder, DaliDecoder, dali_available, make_decoder,
                                uniform_frame_indices)
from emu_mc.data.errors import CORRUPT_IMAGE, CORRUPT_VIDEO, SampleError

from tests.data.helpers import PHOTOS, encode_image, encode_video, pan_frames, photo

SIZE = 32
LEVEL = 1.0 / 255 / min(CLIP_STD)  # one uint8 level in normalised units (the largest of the 3 channels)
needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI is not installed")


def test_dali_is_installed_where_make_test_installs_it():
    """`make test` (what CI runs) installs the optional .[dali] extra: its DALI tests must not skip."""
    if os.environ.get("EMU_MC_EXPECT_DALI") != "1":
        pytest.skip("DALI is optional (pip install -e '.[dali]'); make test sets EMU_MC_EXPECT_DALI=1")
    assert dali_available(), "EMU_MC_EXPECT_DALI=1 but nvidia.dali does not import"


def levels(a: torch.Tensor, b: torch.Tensor):
    """(mean, max) absolute difference in uint8 levels."""
    d = (a - b).abs() / LEVEL
    return float(d.mean()), float(d.max())


@pytest.fixture(scope="module")
def dali_cpu():
    return DaliDecoder(SIZE, "cpu")


@needs_dali
@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_dali_cpu_images_match_pil(dali_cpu, fmt):
    blobs = [encode_image(photo(name, 120, 90), fmt) for name in PHOTOS]
    cpu, cpu_paths = CpuDecoder(SIZE).images(blobs)
    dali, dali_paths = dali_cpu.images(blobs)
    assert cpu_paths == {"image:pil": len(blobs)} and dali_paths == {"image:dali_cpu": len(blobs)}
    for a, b in zip(cpu, dali):
        assert b.shape == (3, SIZE, SIZE) and b.dtype == torch.float32
        mean, worst = levels(a, b)
        assert mean < 1.5 and worst < 12, (mean, worst)  # resampling filters differ slightly


@needs_dali
def test_dali_cpu_vp9_matches_pyav(dali_cpu):
    video = encode_video(pan_frames("rocket", 12), "webm")
    a, path_a = CpuDecoder(SIZE).video(video, 4)
    b, path_b = dali_cpu.video(video, 4)
    assert (path_a, path_b) == ("video:pyav", "video:dali_cpu")
    assert a.shape == b.shape == (4, 3, SIZE, SIZE)
    mean, worst = levels(a, b)
    assert mean < 3 and worst < 40, (mean, worst)  # + YUV->RGB conversion differences
    for k in range(4):  # the same frames, not neighbours
        errors = [levels(b[k], a[j])[0] for j in range(4)]
        assert int(np.argmin(errors)) == k


@needs_dali
def test_dali_cpu_sends_h264_to_pyav(dali_cpu):
    video = encode_video(pan_frames("coffee", 6), "mp4")
    frames, path = dali_cpu.video(video, 3)
    assert path == "video:pyav"
    assert torch.equal(frames, CpuDecoder(SIZE).video(video, 3)[0])


@needs_dali
def test_dali_survives_a_corrupt_jpeg(dali_cpu):
    good = encode_image(photo("chelsea"), "jpeg")
    bad = good[:200] + b"\x00" * 50  # a truncated JPEG
    results, paths = dali_cpu.images([good, bad, good, b"not an image"])
    assert isinstance(results[0], torch.Tensor) and isinstance(results[2], torch.Tensor)
    assert isinstance(results[1], SampleError) and results[1].reason == CORRUPT_IMAGE
    assert isinstance(results[3], SampleError) and results[3].reason == CORRUPT_IMAGE
    assert torch.equal(results[0], results[2])
    again, paths = dali_cpu.images([good])  # the pipeline was rebuilt, not lost
    assert torch.equal(again[0], results[0]) and paths == {"image:dali_cpu": 1}


@needs_dali
def test_dali_cpu_corrupt_video_raises_sample_error(dali_cpu):
    video = encode_video(pan_frames("rocket", 8), "webm")
    for blob in (video[: len(video) // 3], b"\x1a\x45\xdf\xa3" + b"\x00" * 100):
        with pytest.raises(SampleError) as info:
            dali_cpu.video(blob, 2)
        assert info.value.reason == CORRUPT_VIDEO


def test_cpu_corrupt_inputs_raise_sample_errors():
    cpu = CpuDecoder(SIZE)
    (result,), _ = cpu.images([b"\xff\xd8\xff garbage"])
    assert isinstance(result, SampleError) and result.reason == CORRUPT_IMAGE
    with pytest.raises(SampleError) as info:
        cpu.video(b"garbage", 2)
    assert info.value.reason == CORRUPT_VIDEO


def test_grey_and_alpha_images_become_rgb():
    grey = encode_image(photo("coffee")[..., 0], "png")
    rgba = encode_image(np.dstack([photo("coffee"), np.full((40, 48), 128, np.uint8)]), "png")
    (a, b), _ = CpuDecoder(SIZE).images([grey, rgba])
    assert a.shape == b.shape == (3, SIZE, SIZE)


@pytest.mark.parametrize("count,n,expected", [(9, 3, [1, 4, 6]), (100, 8, [6, 18, 31, 43, 56, 68, 80, 93]),
                                              (2, 4, [0, 0, 0, 1]), (1, 3, [0, 0, 0])])
def test_uniform_frame_indices(count, n, expected):
    assert uniform_frame_indices(count, n) == expected


def test_auto_is_cpu_without_cuda_and_dali_gpu_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert make_decoder("auto", SIZE).name == "cpu"
    with pytest.raises(RuntimeError, match="dali_gpu needs a CUDA device"):
        make_decoder("dali_gpu", SIZE)


@pytest.mark.gpu
def test_dali_gpu_matches_cpu():
    gpu = make_decoder("dali_gpu", SIZE)
    blobs = [encode_image(photo(name, 120, 90)) for name in PHOTOS]
    for a, b in zip(CpuDecoder(SIZE).images(blobs)[0], gpu.images(blobs)[0]):
        assert levels(a, b)[0] < 2
    video = encode_video(pan_frames("rocket", 12), "mp4")  # H.264 through NVDEC
    frames, path = gpu.video(video, 4)
    assert path == "video:dali_gpu"
    assert levels(frames, CpuDecoder(SIZE).video(video, 4)[0])[0] < 4


@needs_dali
def test_loader_on_dali_cpu_matches_the_cpu_path(tiny_cfg, tokenizer):
    """The shipped sample set through the loader: same tokens, pixels within the decoders' tolerance."""
    from emu_mc.data import build_data_loader

    runs = {}
    for decoder, workers in (("cpu", 0), ("dali_cpu", 2)):
        tiny_cfg.data.decoder, tiny_cfg.data.num_workers = decoder, workers
        loader = build_data_loader(tiny_cfg, tokenizer)
        try:
            runs[decoder] = ([next(loader) for _ in range(4)], loader.stats())
        finally:  # its decode threads and DALI pipelines end here, not in a later test's forked process
            loader.close()
    for a, b in zip(runs["cpu"][0], runs["dali_cpu"][0]):
        assert torch.equal(a.input_ids, b.input_ids)
        assert levels(a.images, b.images)[0] < 3
    paths = runs["dali_cpu"][1]["decode_paths"]
    assert {"image:dali_cpu", "video:dali_cpu", "video:pyav"} <= set(paths)  # mp4 clips: H.264 via PyAV
    assert runs["dali_cpu"][1]["decoder"] == "dali_cpu"


@needs_dali
def test_a_fork_does_not_hang_on_the_decode_threads_dali_pipelines(dali_cpu):
    """megatron-core's checkpoint writer forks; a child that finalized the decode threads' DALI
    pipelines would wait forever for DALI threads it does not have."""
    import threading
    import time

    decoded, release = threading.Event(), threading.Event()

    def decode_then_idle():  # a decode thread keeps its thread-local pipelines while it lives
        dali_cpu.images([encode_image(photo("chelsea"))])
        decoded.set()
        release.wait()

    threading.Thread(target=decode_then_idle, daemon=True).start()
    assert decoded.wait(60)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    deadline = time.monotonic() + 20
    while os.waitpid(pid, os.WNOHANG)[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung finalizing DALI pipelines")
        time.sleep(0.05)
    release.set()
