"""The full Emu model gives the same loss and gradients in every TP x PP x DP layout (gloo, CPU).

Identical weights (one dist checkpoint) are loaded into TP=1/PP=1 (one process, both microbatches),
TP=2, PP=2 (1F1B over two microbatches), DP=2 (one microbatch per rank) and TP=2 x PP=2 (4 processes);
each run's DP-reduced gradients come back resharded to TP=1 and are compared tensor by tensor.
The reference runs megatron's unfused attention (`local`), every layout the packed-document `sdpa`
backend: the fused attention changes neither loss nor gradients under TP (local heads) and PP.
"""
import json

import pytest
import torch

from emu_mc.config import load_config
from tests.torchrun_utils import torchrun

WORKER = "tests/parallel/workers/layout_worker.py"
LAYOUTS = {"tp2": dict(nproc=2, tp=2, pp=1), "pp2": dict(nproc=2, tp=1, pp=2), "dp2": dict(nproc=2, tp=1, pp=1),
           "tp2pp2": dict(nproc=4, tp=2, pp=2)}
LOSS_RTOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4  # fp32; TP splits reductions, so sums are reordered


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    init = root / "init"
    torchrun(WORKER, ["--init", init, "--save-init"], nproc=1)
    out = {}
    for name, layout in {"ref": dict(nproc=1, tp=1, pp=1), **LAYOUTS}.items():
        run_dir = root / name
        torchrun(WORKER, ["--tp", layout["tp"], "--pp", layout["pp"], "--init", init, "--out", run_dir,
                          "--attention", "local" if name == "ref" else "sdpa"], nproc=layout["nproc"])
        out[name] = (json.loads((run_dir / "result.json").read_text()), run_dir / "grads")
    return out


def load_grads(path, single_process_world, special_ids, tokenizer):
    """A layout's gradient checkpoint, resharded into a TP=1 / PP=1 model: {name: tensor}."""
    from megatron.core import dist_checkpointing

    from emu_mc.model.emu import EmuModel

    cfg = load_config("configs/tiny.yaml")
    model = EmuModel(cfg.model, special_ids, len(tokenizer))
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(path)))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_same_loss_and_grads(layout, runs, single_process_world, special_ids, tokenizer):
    ref, ref_grads = runs["ref"]
    got, got_grads = runs[layout]
    for term in ("loss", "ce", "reg"):
        assert got[term] == pytest.approx(ref[term], rel=LOSS_RTOL), term
    expected = load_grads(ref_grads, single_process_world, special_ids, tokenizer)
    actual = load_grads(got_grads, single_process_world, special_ids, tokenizer)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert expected[name].abs().sum() > 0 or "vision" in name, f"{name}: reference gradient is all zero"
        torch.testing.assert_close(actual[name], expected[name], atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=name)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_replicas_identical_after_step(layout, runs):
    result, _ = runs[layout]
    assert result["dp_replicas_identical"], "DP ranks fed different data disagree after the optimizer step"
    assert result["tp_replicas_identical"], "TP replicas of vision/resampler/heads drifted apart"
