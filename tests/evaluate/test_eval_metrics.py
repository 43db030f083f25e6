"""Metric functions against hand-computed values and pycocoevalcap's (values recorded from
pycocoevalcap 1.2 with its Java PTBTokenizer on the corpus below; re-checked live when it is installed)."""
import math
import shutil

import numpy as np
import pytest

from emu_mc.evaluate.caption_metrics import bleu, caption_scores, cider_d, simple_ptb_tokenize, tokenize_corpus
from emu_mc.evaluate.fid import frechet_distance
from emu_mc.evaluate.prompts import shorten_answer
from emu_mc.evaluate.vqa_accuracy import normalize_answer, vqa_accuracy, vqa_score

REFS = {"1": ["A dog runs on the grass.", "a brown dog running across a lawn", "The dog is playing outside."],
        "2": ["Two cats sleep on a red sofa.", "cats sleeping on a couch", "a pair of cats napping on the sofa"],
        "3": ["A man rides a bicycle down the street.", "a cyclist on a city road", "man riding his bike"],
        "4": ["A plate of pasta with tomato sauce.", "spaghetti on a white plate", "a dish of noodles with sauce"]}
PREDS = {"1": "a dog running on the grass", "2": "two cats on a sofa", "3": "a man riding a bike on the street",
         "4": "a plate of food"}
PYCOCO_CIDER = 1.5162791736046217
PYCOCO_BLEU = [0.9158249606814229, 0.7124995521288974, 0.4016753551846418, 4.8734624737123915e-05]


@pytest.mark.parametrize("raw, normalized", [
    ("Two dogs.", "2 dogs"), ("the cat", "cat"), ("An apple", "apple"), ("dont", "don't"), ("Yes!", "yes"),
    ("1,000", "1000"), ("3.5", "3.5"), ("red-white", "red white"), ("  none\n", "0"), ("isnt it", "isn't it")])
def test_vqa_normalization(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_leave_one_out_average():
    assert vqa_score("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_score("3", ["2"] * 3 + ["3"] * 7) == 1.0
    assert vqa_score("cat", ["cat"] + ["dog"] * 9) == pytest.approx(9 * (1 / 3) / 10)  # only the 9 subsets with it
    assert vqa_score("The Dog", ["dog"] * 10) == 1.0 and vqa_score("4", ["dog"] * 10) == 0.0
    assert vqa_accuracy({"a": "two", "b": "4"}, {"a": ["2"] * 3 + ["3"] * 7, "b": ["dog"]}) == pytest.approx(45.0)


@pytest.mark.parametrize("raw, short", [("The dog, mostly. It runs", "dog"), ("it is red\nmore", "red"),
                                        ("An apple.", "apple"), ("  Yes  ", "yes"), ("theater", "theater")])
def test_release_answer_shortening(raw, short):
    assert shorten_answer(raw) == short


def test_python_ptb_tokenizer():
    assert simple_ptb_tokenize("A Dog's toy, (red)... isn't -- it?") == ["a", "dog", "'s", "toy", "red", "is",
                                                                        "n't", "it"]


def test_cider_d_and_bleu_equal_pycocoevalcap():
    refs, _ = tokenize_corpus(REFS, "python")
    hyps = {k: v[0] for k, v in tokenize_corpus({k: [v] for k, v in PREDS.items()}, "python")[0].items()}
    cider, per_id = cider_d(hyps, refs)
    assert cider == pytest.approx(PYCOCO_CIDER, rel=1e-12) and set(per_id) == set(PREDS)
    assert bleu(hyps, refs) == pytest.approx(PYCOCO_BLEU, rel=1e-6)
    assert cider_d({"1": refs["1"][0]}, {"1": refs["1"]})[0] == 0.0  # one image: every idf is log(1 / 1) = 0


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java")
def test_against_live_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider import Cider

    refs, name = tokenize_corpus(REFS, "java")
    hyps, _ = tokenize_corpus({k: [v] for k, v in PREDS.items()}, "java")
    expected, _ = Cider().compute_score({k: [" ".join(s) for s in v] for k, v in refs.items()},
                                        {k: [" ".join(v[0])] for k, v in hyps.items()})
    assert name == "ptb-java" and caption_scores(PREDS, REFS, "java")["CIDEr"] == pytest.approx(100 * expected)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 3)), rng.normal(loc=1.0, scale=2.0, size=(300, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = np.linalg.cholesky(s_a)  # tr sqrt(S_a S_b) = sum of sqrt of the eigenvalues of L^T S_b L
    trace_sqrt = np.sqrt(np.linalg.eigvalsh(root_a.T @ s_b @ root_a)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert math.isfinite(frechet_distance(a[:2], b[:2]))  # singular covariances


def test_clip_score_is_the_clamped_cosine_of_clips_embeddings(tiny_clip_dir):
    """clip_score == 100 * mean(max(cos(image embedding, caption embedding), 0)) computed by CLIPModel's own
    forward (its logits are logit_scale * cosine) on the same preprocessed inputs."""
    import numpy as np
    import torch

    from emu_mc.evaluate.clip_score import clip_score, load_clip

    clip = load_clip(tiny_clip_dir, torch.device("cpu"))
    model, tokenizer, processor = clip
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 48), (32, 32), (64, 36)]]
    captions = ["a red bus", "two cats on a sofa", "x" * 300]  # the last one is cut to 77 positions
    got = clip_score(clip, images, captions, torch.device("cpu"), batch_size=2)
    with torch.no_grad():
        out = model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"],
                    **tokenizer(captions, padding=True, truncation=True, max_length=77, return_tensors="pt"))
        cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert got == pytest.approx(float(100 * cos.clamp(min=0).mean()), abs=1e-4)
    assert 0.0 <= got <= 100.0


def test_clip_score_needs_a_local_clip_directory(tmp_path):
    import torch

    from emu_mc.evaluate.clip_score import load_clip
    from emu_mc.inference.settings import GenerationInputError

    with pytest.raises(GenerationInputError, match="not a directory"):
        load_clip(str(tmp_path / "missing"), torch.device("cpu"))
    with pytest.raises(GenerationInputError, match="not a CLIPModel directory"):
        load_clip(str(tmp_path), torch.device("cpu"))
