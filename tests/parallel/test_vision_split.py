"""The vision side split over TP ranks: share sizes, the differentiable gather, and pretrain.py at TP = 2
(images counted once per step in the throughput/FLOPs metrics, vision time reported per TP rank)."""
import json

import pytest
import torch

from emu_mc.parallel.vision_split import _contiguous_runs, image_shares
from tests.torchrun_utils import torchrun

PRETRAIN = "emu_mc/pretrain.py"


@pytest.mark.parametrize("num_images,tp,expected", [
    (0, 2, [0, 0]), (1, 4, [1, 0, 0, 0]), (3, 2, [2, 1]), (7, 3, [3, 2, 2]), (8, 8, [1] * 8)])
def test_image_shares_are_balanced_and_ordered(num_images, tp, expected):
    assert image_shares(num_images, tp) == expected


def test_contiguous_grads_are_reduced_as_few_views_of_their_buffer():
    buffer = torch.arange(10.0)
    a, b, c = buffer[0:3].view(3, 1), buffer[3:5], buffer[7:10]  # a and b back to back, then a gap
    views = _contiguous_runs([c, b, a])
    assert [v.tolist() for v in views] == [[0.0, 1.0, 2.0, 3.0, 4.0], [7.0, 8.0, 9.0]]
    views[0].mul_(2)  # views, not copies
    assert a.flatten().tolist() == [0.0, 2.0, 4.0] and b.tolist() == [6.0, 8.0]


def test_pretrain_at_tp2_counts_each_image_once_and_times_the_vision_side_per_rank(tmp_path):
    images_per_row, rows, microbatches = 3, 2, 2
    torchrun(PRETRAIN, ["--config", "configs/tiny.yaml", "--train.out_dir", tmp_path, "--train.steps", 2,
                        "--parallel.tensor_parallel", 2, "--data.kind", "synthetic",
                        "--data.images_per_synthetic_sample", images_per_row, "--data.micro_batch_size", rows,
                        "--parallel.num_microbatches", microbatches, "--train.recompute_vision", "true"],
             nproc=2, timeout=600)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        # one DP replica: each image once per step, although each TP rank encoded only its share
        assert r["images_per_s"] * r["step_time_s"] == pytest.approx(images_per_row * rows * microbatches)
        assert len(r["vision_time_s_per_rank"]) == 2 and all(t > 0 for t in r["vision_time_s_per_rank"])
        assert r["vision_time_s"] == max(r["vision_time_s_per_rank"]) < r["step_time_s"]
