"""The full Emu model gives the same loss and gradients in every TP x PP x DP layout (gloo, CPU).

Identical weights (one dist checkpoint) are loaded into TP=1/PP=1 (one process, all microbatches),
TP=2 with the vision side split over TP ranks (the default) and replicated (the old layout), PP=2
(1F1B) with even and uneven stages, DP=2, and TP=2 x PP=2 with an uneven first stage (4 processes);
each run's DP-reduced gradients come back resharded to TP=1 and are compared tensor by tensor. The
global batch's microbatches hold 3, 1, 0 and 4 images, so TP=2 shares are uneven, empty, or both empty.
One launch per world size runs all of its layouts (emu_mc/parallel layouts: README "Layout").
The reference runs megatron's unfused attention (`local`) on rows of 3 packed documents plus padding,
every layout the packed-document `sdpa` backend: the fused attention changes neither loss nor gradients
under TP (local heads) and PP.
"""
import json

import pytest
import torch

from emu_mc.config import load_config
from emu_mc.parallel.vision_split import image_shares
from tests.parallel.workers.layout_worker import IMAGES_PER_ROW
from tests.torchrun_utils import torchrun

WORKER = "tests/parallel/workers/layout_worker.py"
COMMON = ["--model.llm.num_layers", "4"]  # PP = 2 can then split the LLM 2 + 2 or 1 + 3
LAYOUTS = {  # name: (processes, tp, pp, config overrides)
    "tp2": (2, 2, 1, []),
    "tp2_replicated": (2, 2, 1, ["--parallel.vision_layout", "replicated"]),
    "pp2": (2, 1, 2, []),
    "pp2_uneven": (2, 1, 2, ["--parallel.llm_layers_first_stage", "1", "--parallel.llm_layers_last_stage", "3"]),
    "dp2": (2, 1, 1, []),
    "tp2pp2_uneven": (4, 2, 2, ["--parallel.llm_layers_first_stage", "1"]),
}
LOSS_RTOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4  # fp32; TP splits reductions, so sums are reordered


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    init = root / "init"
    launches = {1: [dict(name="ref", tp=1, pp=1, set=["--model.llm.attention_impl", "local"])]}
    for name, (nproc, tp, pp, overrides) in LAYOUTS.items():
        launches.setdefault(nproc, []).append(dict(name=name, tp=tp, pp=pp,
                                                   set=overrides + ["--model.llm.attention_impl", "sdpa"]))
    for nproc, layouts in launches.items():
        torchrun(WORKER, ["--init", init, "--out", root, "--set", json.dumps(COMMON), "--runs", json.dumps(layouts),
                          *(["--save-init"] if nproc == 1 else [])], nproc=nproc, timeout=600)
    return {name: (json.loads((root / name / "result.json").read_text()), root / name / "grads")
            for name in ["ref", *LAYOUTS]}


def load_grads(path, single_process_world, special_ids, tokenizer):
    """A layout's gradient checkpoint, resharded into a TP=1 / PP=1 model: {name: tensor}."""
    from megatron.core import dist_checkpointing

    from emu_mc.model.emu import EmuModel

    cfg = load_config("configs/tiny.yaml", COMMON)
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


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_tp_rank_encodes_only_its_share(layout, runs):
    """Split: a TP rank runs the encoder on its balanced share of each microbatch's images (none when
    the microbatch has fewer images than TP ranks); replicated: on all of them; later stages: none."""
    nproc, tp, pp, overrides = LAYOUTS[layout]
    result, _ = runs[layout]
    split = "replicated" not in overrides
    images = [sum(rows) for rows in IMAGES_PER_ROW]
    per_dp = len(images) // (nproc // (tp * pp))
    for rank in result["ranks"]:
        mine = images[rank["dp_rank"] * per_dp:(rank["dp_rank"] + 1) * per_dp]
        shares = [image_shares(n, tp)[rank["tp_rank"]] if split else n for n in mine]
        assert rank["images_encoded"] == (sum(shares) if rank["pp_rank"] == 0 else 0), rank


def test_uneven_stages_hold_the_configured_layers(runs):
    layers = {name: sorted({(r["pp_rank"], r["llm_layers"]) for r in runs[name][0]["ranks"]})
              for name in ("pp2", "pp2_uneven", "tp2pp2_uneven")}
    assert layers == {"pp2": [(0, 2), (1, 2)], "pp2_uneven": [(0, 1), (1, 3)], "tp2pp2_uneven": [(0, 1), (1, 3)]}
