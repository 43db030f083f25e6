"""Fixtures for the evaluation tests: the generation tests' one-step tiny checkpoint, and tiny
evaluation sets in the standard formats (random-pixel images, hand-written captions and answers)."""
import json

import numpy as np
import pytest
from PIL import Image

from tests.inference.conftest import tiny_decoder_dir, tiny_run  # noqa: F401  (the same session fixtures)

CAPTIONS = [["a cat on a sofa", "a grey cat lying on a couch"], ["a red car on a road", "a car parked outside"],
            ["two dogs in the snow", "dogs playing in snow"], ["a bowl of fruit", "apples and pears in a bowl"]]
QUESTIONS = [("what animal is this", ["cat"] * 8 + ["kitten"] * 2), ("what color is the car", ["red"] * 10),
             ("how many dogs are there", ["2"] * 6 + ["two"] * 4), ("is there fruit", ["yes"] * 10)]


@pytest.fixture(scope="session")
def eval_set(tmp_path_factory):
    """(folder, {"captions": COCO caption json, "questions": VQAv2 questions json, "answers": annotations})."""
    folder = tmp_path_factory.mktemp("evalset")
    rng = np.random.default_rng(1)
    images = []
    for i in range(4):
        name = f"COCO_val2014_{i + 1:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(folder / name)
        images.append({"id": i + 1, "file_name": name})
    files = {"captions": folder / "captions.json", "questions": folder / "questions.json",
             "answers": folder / "answers.json"}
    files["captions"].write_text(json.dumps({"images": images, "annotations": [
        {"image_id": i + 1, "id": 10 * i + j, "caption": c} for i, cs in enumerate(CAPTIONS) for j, c in enumerate(cs)]}))
    files["questions"].write_text(json.dumps({"questions": [
        {"question_id": 100 + i, "image_id": i + 1, "question": q} for i, (q, _) in enumerate(QUESTIONS)]}))
    files["answers"].write_text(json.dumps({"annotations": [
        {"question_id": 100 + i, "image_id": i + 1, "answers": [{"answer": a} for a in ans]}
        for i, (_, ans) in enumerate(QUESTIONS)]}))
    return folder, {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="session")
def video_qa_set(tmp_path_factory):
    """(MSVD-QA style json, its folder): two random-pixel clips named vid{video_id}.webm, three questions."""
    from tests.data.helpers import encode_video

    folder = tmp_path_factory.mktemp("videoqa")
    rng = np.random.default_rng(2)
    for video_id in (1, 2):
        (folder / f"vid{video_id}.webm").write_bytes(encode_video(rng.integers(0, 256, (6, 24, 32, 3), dtype=np.uint8)))
    records = [{"id": 0, "video_id": 1, "question": "what is moving", "answer": "car"},
               {"id": 1, "video_id": 1, "question": "what color is it", "answer": "red"},
               {"id": 2, "video_id": 2, "question": "who is talking", "answer": "man"}]
    path = folder / "test_qa.json"
    path.write_text(json.dumps(records))
    return str(path)


@pytest.fixture(scope="session")
def tiny_inception(tmp_path_factory):
    """A TorchScript stand-in for the FID Inception (same call: uint8 images, return_features=True)."""
    import torch

    class TinyInception(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 1).flatten(1)  # [N, 3]

    path = tmp_path_factory.mktemp("inception") / "inception.pt"
    torch.jit.script(TinyInception()).save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random tiny Hugging Face CLIPModel directory with a byte-level CLIP tokenizer (no merges)."""
    import json

    import torch
    from transformers import CLIPConfig, CLIPModel
    from tokenizers.pre_tokenizers import ByteLevel

    folder = tmp_path_factory.mktemp("clip")
    chars = sorted(ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                         eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    return str(folder)
