"""`python -m emu_mc.generate` on a real pretraining checkpoint: loading, text and image requests,
outputs; and bad input, each one line on stderr with exit code 2."""
import json
import os
import subprocess
import sys

import pytest
import torch

from emu_mc.generate import main, read_requests
from emu_mc.inference import Request, TextSettings, generate_text, load_emu
from tests.torchrun_utils import REPO_ROOT, child_env


def test_load_checkpoint_any_path_form(tiny_run):
    """A run's out_dir, its checkpoints/ and its step directory load the same trained weights."""
    from megatron.core import dist_checkpointing

    loaded = [load_emu(p) for p in (tiny_run, os.path.join(tiny_run, "checkpoints"),
                                    os.path.join(tiny_run, "checkpoints", "step_000001"))]
    step_dir = loaded[0].checkpoint
    assert step_dir.endswith("step_000001") and all(e.checkpoint == step_dir for e in loaded)
    saved = dist_checkpointing.load({"model": loaded[0].model.sharded_state_dict()}, step_dir)["model"]
    params = dict(loaded[0].model.named_parameters())
    for name, param in params.items():
        torch.testing.assert_close(param, saved[name], rtol=0, atol=0, msg=name)
    outs = [generate_text(e, [Request("A photo of")], TextSettings(max_new_tokens=4))[0].tokens for e in loaded]
    assert outs[0] == outs[1] == outs[2]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_and_image_requests_file(tiny_run, tiny_decoder_dir, image_files, tmp_path, capsys):
    paths, _ = image_files
    requests = tmp_path / "requests.jsonl"
    os.symlink(paths[0], tmp_path / "cat.png")
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"id": "caption", "prompt": "{image} a photo of", "images": ["cat.png"]},
        {"prompt": "The dog runs"},
        {"id": "drawing", "prompt": "a cat", "mode": "image"}]) + "\n")
    out = tmp_path / "out" / "results.jsonl"
    code, stdout, stderr = run_cli(capsys, "--checkpoint", tiny_run, "--requests", requests, "--out", out,
                                   "--decoder", tiny_decoder_dir[0], "--steps", 2, "--max-new-tokens", 5,
                                   "--num-beams", 2)
    assert code == 0, stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["caption", 1, "drawing"]
    assert all(len(r["tokens"]) <= 5 and "score" in r for r in records[:2])
    assert records[2]["image"] == str(tmp_path / "out" / "drawing.png") and os.path.isfile(records[2]["image"])
    assert "[caption]" in stdout and "drawing.png" in stdout


def one_line_error(code, stderr, *needles):
    """Exit code 2 and one `error:` line naming the culprit (log lines aside), no traceback."""
    assert code == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_missing_image(tiny_run, tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    one_line_error(*run_cli(capsys, "--checkpoint", tiny_run, "--prompt", "{image} a photo", "--image", missing)[::2],
                   str(missing), "no such file")


def test_unreadable_image(tiny_run, image_files, capsys):
    _, broken = image_files
    one_line_error(*run_cli(capsys, "--checkpoint", tiny_run, "--prompt", "a photo", "--image", broken)[::2], broken)


def test_prompt_longer_than_the_positions(tiny_run, capsys):
    one_line_error(*run_cli(capsys, "--checkpoint", tiny_run, "--prompt", "a cat sat on the mat. " * 200)[::2],
                   "longer than", "256 positions")


def test_checkpoint_directory_without_a_model(tmp_path, capsys):
    one_line_error(*run_cli(capsys, "--checkpoint", tmp_path, "--prompt", "hi")[::2], str(tmp_path), "no model")


def test_decoder_of_another_width(tiny_run, tiny_decoder_dir, capsys):
    one_line_error(*run_cli(capsys, "--checkpoint", tiny_run, "--mode", "image", "--prompt", "a cat",
                            "--decoder", tiny_decoder_dir[1])[::2], tiny_decoder_dir[1], "cross_attention_dim is 32",
                   "LLM width is 64")


def test_bad_setting_and_missing_decoder(tiny_run, capsys):
    one_line_error(*run_cli(capsys, "--checkpoint", tiny_run, "--prompt", "hi", "--top-p", "0")[::2], "top_p")
    one_line_error(*run_cli(capsys, "--checkpoint", tiny_run, "--prompt", "hi", "--mode", "image")[::2], "--decoder")


def test_exit_code_from_the_command_line(tmp_path):
    """The real command: no traceback, exit code 2."""
    proc = subprocess.run([sys.executable, "-m", "emu_mc.generate", "--checkpoint", str(tmp_path), "--prompt", "hi",
                           "--image", str(tmp_path / "missing.png")], cwd=REPO_ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "missing.png: no such file" in proc.stderr


@pytest.mark.slow
def test_tensor_parallel_2_checkpoint_and_generation(tmp_path, tokenizer, image_files):
    """A TP = 2 run's checkpoint loads into one process: the loaded model's loss on the run's second
    batch equals the loss the run logged for it (step 2 trains from the step-1 weights saved). And
    generation under torchrun with TP = 2 writes the tokens one process writes."""
    from emu_mc.config import load_config
    from emu_mc.data.loader import SyntheticLoader
    from tests.conftest import TINY_CONFIG
    from tests.torchrun_utils import torchrun

    out = tmp_path / "tp2"
    args = ["--config", TINY_CONFIG, "--data.kind", "synthetic", "--train.out_dir", out, "--train.steps", 2,
            "--train.checkpoint_every", 1, "--parallel.tensor_parallel", 2]
    torchrun("emu_mc/pretrain.py", args, nproc=2, timeout=600)
    step_2_loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])["loss"]
    emu = load_emu(str(out / "checkpoints" / "step_000001"))
    cfg = load_config(REPO_ROOT / TINY_CONFIG, ["--data.kind", "synthetic"])
    loader = SyntheticLoader(cfg, tokenizer, dp_rank=0)
    next(loader)
    with torch.no_grad():
        loss = emu.model(next(loader))["loss"]
    assert float(loss) == pytest.approx(step_2_loss, abs=1e-5)

    paths, _ = image_files
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"prompt": "{image} a photo of", "images": [paths[0]]}) + "\n" +
                        json.dumps({"prompt": "The dog runs"}) + "\n")
    # beam search: logits gathered over the vocab shards, rows reordered in every rank's cache
    settings = ["--checkpoint", emu.checkpoint, "--requests", requests, "--max-new-tokens", 6, "--num-beams", 3,
                "--out", tmp_path / "tp2.jsonl"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "emu_mc.generate", *map(str, settings)],
                          cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    generated = [json.loads(line)["tokens"] for line in (tmp_path / "tp2.jsonl").read_text().splitlines()]
    single = generate_text(emu, read_requests(str(requests)), TextSettings(max_new_tokens=6, num_beams=3))
    assert generated == [r.tokens for r in single]
