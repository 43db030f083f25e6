"""`python -m emu_mc.evaluate` end to end on the tiny checkpoint: outputs, resume, shots, bad input."""
import json
import os

import pytest

from emu_mc.evaluate.cli import main
from emu_mc.evaluate.datasets import read_vqa
from emu_mc.evaluate.prompts import build_request, choose_shots

FAST = ["--num-beams", "2", "--max-new-tokens", "4", "--no-progress", "--caption-tokenizer", "python"]


def evaluate(capsys, *args):
    code = main([str(a) for a in args] + FAST)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_caption_outputs(tiny_run, eval_set, tmp_path, capsys):
    _, files = eval_set
    out = tmp_path / "coco"
    code, stdout, stderr = evaluate(capsys, "--task", "coco_caption", "--checkpoint", tiny_run, "--data",
                                    files["captions"], "--out", out)
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "coco_caption" and results["n"] == 4 and results["shots"] == 0
    assert set(results["metrics"]) == {"CIDEr", "BLEU-4", "BLEU-1", "tokenizer", "errors"}
    assert results["metrics"]["tokenizer"] == "ptb-python" and "torch" in results["versions"]
    assert [r["id"] for r in read_jsonl(out / "predictions.jsonl")] == ["1", "2", "3", "4"]
    assert not list(out.glob("predictions.rank*"))
    report = (out / "report.md").read_text()
    assert "not entered" in report and "Table 1" in report and "CIDEr" in report


def test_vqa_resume_skips_finished_ids(tiny_run, eval_set, tmp_path, capsys):
    _, files = eval_set
    out = tmp_path / "vqa"
    args = ["--task", "vqav2", "--checkpoint", tiny_run, "--data", files["questions"], "--annotations",
            files["answers"], "--out", out, "--style", "instruct", "--batch-size", "1"]
    assert evaluate(capsys, *args)[0] == 0
    full = json.loads((out / "results.json").read_text())["metrics"]["accuracy"]
    records = read_jsonl(out / "predictions.jsonl")
    os.remove(out / "results.json")
    numbers = tmp_path / "paper.json"
    numbers.write_text(json.dumps({"vqav2": {"value": 12.5, "source": "Table 9, row Emu, VQAv2"}}))
    assert evaluate(capsys, *args, "--score-only", "--checkpoint", "/not/loaded", "--paper-numbers", numbers)[0] == 0
    assert json.loads((out / "results.json").read_text())["metrics"]["accuracy"] == full  # no model needed
    assert "| 12.50 | arXiv:2307.05222 Table 9, row Emu, VQAv2 |" in (out / "report.md").read_text()
    numbers.write_text(json.dumps({"vqav2": {"value": 12.5}}))
    code, _, stderr = evaluate(capsys, *args, "--score-only", "--paper-numbers", numbers)
    assert code == 2 and stderr.strip().splitlines() == [
        f'error: --paper-numbers {numbers}: vqav2 needs a numeric "value" and a "source" naming the paper\'s '
        'table and row']
    # a run killed after two examples: a rank file holding them (one marked), no merged file
    os.remove(out / "predictions.jsonl")
    kept = [dict(records[0], raw="KEPT"), records[1]]
    (out / "predictions.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "10')
    assert evaluate(capsys, *args)[0] == 0
    resumed = read_jsonl(out / "predictions.jsonl")
    assert resumed[0]["raw"] == "KEPT" and resumed[1:] == records[1:]
    assert json.loads((out / "results.json").read_text())["metrics"]["accuracy"] == full


def test_shots_reproducible(eval_set):
    _, files = eval_set
    examples = read_vqa(files["questions"], files["answers"], os.path.dirname(files["questions"]),
                        "COCO_val2014_{image_id:012d}.jpg")
    picks = [[s.id for s in choose_shots(examples, examples[0], 2, seed)] for seed in (0, 0, 1, 2, 3)]
    assert picks[0] == picks[1] and "100" not in picks[0] and len(set(map(tuple, picks))) > 1
    request = build_request("vqa", "base", "image", examples[0], choose_shots(examples, examples[0], 2, 0))
    assert request.prompt.count("{image}") == 3 and request.images[-1] == examples[0].media
    assert request.prompt.endswith("question: what animal is this short answer:")


def test_instruct_prompts_are_the_releases():
    from emu_mc.evaluate.datasets import Example
    from emu_mc.evaluate.prompts import SYSTEM, VIDEO_SYSTEM

    image, video = Example("1", "a.jpg", "what is it", ["cat"]), Example("2", "b.mp4", "who runs", ["man"])
    assert build_request("caption", "instruct", "image", image, []).prompt == (
        f"{SYSTEM} [USER]: {{image}} please provide an accurate and concise description of the given image. "
        "[ASSISTANT]: the image depicts a photo of")
    assert build_request("vqa", "instruct", "image", image, []).prompt == (
        f"{SYSTEM} [USER]: {{image}} based on the content of the image and common sense, please provide an "
        "accurate answer consisting of only one word or phrase. what is it [ASSISTANT]: the answer is:")
    request = build_request("vqa", "instruct", "video", video, [image])
    assert request.prompt.startswith(f"{VIDEO_SYSTEM} [USER]: {{video}} based on the content of the video")
    assert " the answer is: cat [USER]: {video}" in request.prompt and request.videos == ["a.jpg", "b.mp4"]


def test_few_shot_run(tiny_run, eval_set, tmp_path, capsys):
    """(The tiny model's 256 positions hold 2 shots of the base prompt, not of the instruct one.)"""
    _, files = eval_set
    code, _, stderr = evaluate(capsys, "--task", "okvqa", "--checkpoint", tiny_run, "--data", files["questions"],
                               "--annotations", files["answers"], "--out", tmp_path, "--shots", "2", "--limit", "3")
    assert code == 0, stderr
    assert json.loads((tmp_path / "results.json").read_text())["shots"] == 2


def test_example_too_long_scores_as_wrong(tiny_run, eval_set, tmp_path, capsys):
    """Instruct prompts with 2 shots overflow the tiny model's 256 positions: each such example is an
    error record scored as wrong, and the run goes on (a rank that stopped would leave the others waiting)."""
    _, files = eval_set
    code, _, stderr = evaluate(capsys, "--task", "vqav2", "--checkpoint", tiny_run, "--data", files["questions"],
                               "--annotations", files["answers"], "--out", tmp_path, "--shots", "2",
                               "--style", "instruct", "--limit", "3")
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
    assert metrics == {"accuracy": 0.0, "errors": 3}
    assert all("longer than" in r["error"] for r in read_jsonl(tmp_path / "predictions.jsonl"))


@pytest.mark.parametrize("change, needle", [
    ({"--media-dir": "/nonexistent"}, "media file"),
    ({"--data": "/nonexistent.json"}, "--data /nonexistent.json"),
    ({"--shots": "9"}, "--shots 9"),
])
def test_bad_input_one_line(tiny_run, eval_set, tmp_path, capsys, change, needle):
    _, files = eval_set
    args = {"--task": "coco_caption", "--checkpoint": tiny_run, "--data": files["captions"], "--out": tmp_path}
    args.update(change)
    code, _, stderr = evaluate(capsys, *[x for kv in args.items() for x in kv])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and needle in errors[0] and "Traceback" not in stderr


def test_two_ranks_same_metric_as_one(tiny_run, eval_set, tmp_path, capsys):
    """torchrun with 2 data-parallel ranks: disjoint shards, gathered on rank 0, the 1-rank predictions."""
    from tests.torchrun_utils import torchrun

    _, files = eval_set
    args = ["--task", "vqav2", "--checkpoint", tiny_run, "--data", files["questions"], "--annotations",
            files["answers"], "--batch-size", "1"] + FAST
    assert evaluate(capsys, *args, "--out", tmp_path / "one")[0] == 0
    proc = torchrun("emu_mc/evaluate/__main__.py", args + ["--out", str(tmp_path / "two")], nproc=2, timeout=240)
    assert "2 on this rank (DP 0 of 2)" in proc.stdout
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["n"] == one["n"] == 4 and two["metrics"] == one["metrics"]
    assert read_jsonl(tmp_path / "two" / "predictions.jsonl") == read_jsonl(tmp_path / "one" / "predictions.jsonl")


def test_video_qa(tiny_run, video_qa_set, tmp_path, capsys):
    code, stdout, stderr = evaluate(capsys, "--task", "msvd_qa", "--checkpoint", tiny_run, "--data", video_qa_set,
                                    "--media-name", "vid{video_id}.webm", "--out", tmp_path)
    assert code == 0, stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["n"] == 3 and 0.0 <= results["metrics"]["accuracy"] <= 100.0


def test_text_to_image_fid(tiny_run, tiny_decoder_dir, tiny_inception, tiny_clip_dir, eval_set, tmp_path, capsys):
    _, files = eval_set
    args = ["--task", "t2i_coco", "--checkpoint", tiny_run, "--data", files["captions"], "--out", tmp_path,
            "--decoder", tiny_decoder_dir[0], "--steps", "2"]
    code, _, stderr = evaluate(capsys, *args, "--inception", tiny_inception, "--clip", tiny_clip_dir)
    assert code == 0, stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["n"] == 4 and results["metrics"]["FID"] >= 0.0
    assert 0.0 <= results["metrics"]["CLIP score"] <= 100.0
    assert all(os.path.isfile(r["image"]) for r in read_jsonl(tmp_path / "predictions.jsonl"))
    code, _, stderr = evaluate(capsys, *args, "--inception", tmp_path / "missing.pt")
    assert code == 2 and "--inception" in stderr and "downloaded" in stderr
    code, _, stderr = evaluate(capsys, *args, "--inception", tiny_inception, "--clip", tmp_path / "no-clip")
    assert code == 2 and "--clip" in stderr and "downloaded" in stderr


@pytest.mark.parametrize("task, data", [
    ("coco_caption", ["captions.json"]), ("vqav2", ["vqa_questions.json", "--annotations", "vqa_annotations.json"]),
    ("msrvtt_qa", ["video_qa.json"])])
def test_bundled_eval_sets(tiny_run, tmp_path, capsys, task, data):
    """The sets in data/sample/eval run end to end on the tiny checkpoint."""
    from tests.torchrun_utils import REPO_ROOT

    folder = REPO_ROOT / "data" / "sample" / "eval"
    paths = [str(folder / x) if x.endswith(".json") else x for x in data]
    code, _, stderr = evaluate(capsys, "--task", task, "--checkpoint", tiny_run, "--data", *paths, "--out", tmp_path)
    assert code == 0, stderr
    assert json.loads((tmp_path / "results.json").read_text())["n"] == {"coco_caption": 4, "vqav2": 8}.get(task, 3)
