"""Decoder training on CPU: the tiny UNet/VAE on the bundled pairs, conditioned by a tiny pretraining
checkpoint. Loss finite and falling, checkpoint + exact resume (also after kill -9), EMA and v-prediction
export -> generation, one-line errors, and two gloo ranks under torchrun."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from emu_mc.train_decoder import main, train
from tests.torchrun_utils import child_env, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs/decoder_tiny.yaml")
SHARDS = os.path.join(ROOT, "data/sample/image_text/laion-{000000..000001}.tar")


def overrides(tiny_run, decoder_init, out_dir, steps):
    return ["--emu.checkpoint", tiny_run, "--decoder.init", decoder_init, "--decoder.resolution", "16",
            "--data.sources.0.shards", SHARDS, "--train.out_dir", str(out_dir), "--train.steps", str(steps),
            "--decoder.cond_drop_prob", "0.3"]


def run(args):
    from emu_mc.decoder.config import load_decoder_config

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train(load_decoder_config(CONFIG, args))
    finally:  # train() installs its checkpoint-on-signal handlers
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_train_resume_export_generate(tiny_run, decoder_init, tmp_path):
    from emu_mc.inference import ImageSettings, Request, VisualDecoder, generate_images, load_emu

    whole = tmp_path / "whole"
    metrics = run(overrides(tiny_run, decoder_init, whole, 6))
    full = losses(whole)
    assert len(full) == 6 and all(loss == loss for loss in full) and full[-1] < full[0], full
    assert 0.0 < metrics["cond_drop_rate"] < 0.7  # 12 draws at 0.3
    parted = tmp_path / "parted"
    run(overrides(tiny_run, decoder_init, parted, 3))
    assert os.path.isdir(parted / "checkpoints" / "step_000003")
    run(overrides(tiny_run, decoder_init, parted, 6))  # resumes at step 3
    assert losses(parted) == full  # exact resume: same data, noise, timesteps, drops and AdamW state
    decoder = VisualDecoder.load(str(whole / "decoder"), llm_width=64)
    images, _ = generate_images(load_emu(tiny_run), decoder, [Request("a cat")], ImageSettings(steps=2))
    assert images[0].shape == (16, 16, 3)


@pytest.mark.parametrize("extra, message", [
    (["--emu.checkpoint", "/nonexistent"], "emu.checkpoint: "),
    (["--decoder.cond_drop_prob", "1.5"], "decoder.cond_drop_prob: must be in [0, 1)"),
    (["--data.sources.0.kind", "video_text"], "data.sources[0].kind: must be image_text"),
    (["--data.sources.0.shards", "/nonexistent/x-{0..1}.tar"], "data.sources[0].shards: no file matches"),
    (["--decoder.init", "WIDTH32"], "decoder.init: "),
])
def test_bad_config_one_line(tiny_run, decoder_init, tmp_path, capsys, extra, message):
    if extra[-1] == "WIDTH32":
        from emu_mc.inference.tiny_decoder import write_tiny_decoder

        extra = ["--decoder.init", write_tiny_decoder(str(tmp_path / "w32"), cross_attention_dim=32, sample_size=8)]
    code = main(["--config", CONFIG, *overrides(tiny_run, decoder_init, tmp_path / "out", 1), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_two_gloo_ranks(tiny_run, decoder_init, tmp_path):
    out = tmp_path / "dp2"
    torchrun("emu_mc/train_decoder.py", ["--config", CONFIG, *overrides(tiny_run, decoder_init, out, 2)], timeout=240)
    assert len(losses(out)) == 2 and os.path.isdir(out / "decoder" / "unet")
    with open(out / "checkpoints" / "step_000002" / "meta.json") as f:
        assert json.load(f)["dp"] == 2


def test_ema_export_and_v_prediction(tiny_run, decoder_init, tmp_path):
    """With decoder.ema_decay 0.5 the exported UNet after one step is 0.5 * (init + step-1 weights); the
    exported scheduler carries v_prediction, and generation runs it."""
    from diffusers import UNet2DConditionModel

    from emu_mc.inference import ImageSettings, Request, VisualDecoder, generate_images, load_emu

    v_pred = ["--decoder.prediction_type", "v_prediction"]
    run(overrides(tiny_run, decoder_init, tmp_path / "raw", 1) + v_pred)
    run(overrides(tiny_run, decoder_init, tmp_path / "ema", 1) + v_pred + ["--decoder.ema_decay", "0.5"])

    def weights(path, sub="unet"):
        return UNet2DConditionModel.from_pretrained(path, subfolder=sub, low_cpu_mem_usage=False).state_dict()

    init, raw, ema = weights(decoder_init), weights(tmp_path / "raw" / "decoder"), weights(tmp_path / "ema" / "decoder")
    changed = [name for name in init if not torch.equal(raw[name], init[name])]
    assert changed
    for name in changed:
        torch.testing.assert_close(ema[name], 0.5 * (init[name] + raw[name]), atol=1e-6, rtol=0)
    with open(tmp_path / "ema" / "decoder" / "scheduler" / "scheduler_config.json") as f:
        scheduler = json.load(f)
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["_class_name"] == "PNDMScheduler"
    assert scheduler["skip_prk_steps"]  # decoder.init's sampler settings kept
    decoder = VisualDecoder.load(str(tmp_path / "ema" / "decoder"), llm_width=64)
    images, _ = generate_images(load_emu(tiny_run), decoder, [Request("a cat")], ImageSettings(steps=2))
    assert images[0].shape == (16, 16, 3)


@pytest.mark.slow
def test_kill_9_and_resume(tiny_run, decoder_init, tmp_path):
    """A run killed with SIGKILL after a checkpoint and started again logs the uninterrupted run's losses
    (both in subprocesses: the same thread count, so the same float reductions)."""
    def command(out_dir):
        args = overrides(tiny_run, decoder_init, out_dir, 8) + ["--train.checkpoint_every", "2"]
        return [sys.executable, "-m", "emu_mc.train_decoder", "--config", CONFIG, *args]

    cmd = command(tmp_path / "killed")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL and latest.exists(), "not killed after a checkpoint"
    for again in (cmd, command(tmp_path / "whole")):
        subprocess.run(again, cwd=ROOT, env=child_env(), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=180)
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")


def test_bad_data_stops_the_run_in_one_line(tiny_run, decoder_init, tmp_path, capsys):
    """Shards of undecodable images: the samples are skipped and counted, then the run stops (exit 1)
    with pretraining's one-line data error."""
    import io
    import tarfile

    shard = tmp_path / "bad-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            for ext, data in (("jpg", b"not a jpeg"), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    args = overrides(tiny_run, decoder_init, tmp_path / "out", 2)
    args += ["--data.sources.0.shards", str(shard), "--data.failure_check_after", "4"]
    code = main(["--config", CONFIG, *args])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
    assert code == 1 and len(err) == 1 and err[0].startswith("run stopped: data: ") and "corrupt_image" in err[0], err


def test_resume_on_other_data_is_refused(tiny_run, decoder_init, tmp_path, capsys):
    """A checkpoint written reading some shards does not resume on others (its loader positions would
    index into the wrong stream): exit 2, one line naming the field."""
    run(overrides(tiny_run, decoder_init, tmp_path, 1))
    capsys.readouterr()
    code = main(["--config", CONFIG, *overrides(tiny_run, decoder_init, tmp_path, 2), "--data.sources.0.weight", "2"])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
    assert code == 2 and len(err) == 1 and err[0].startswith("config error: data.sources: ") and \
        "another train.out_dir" in err[0], err
