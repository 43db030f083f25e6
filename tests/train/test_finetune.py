"""Instruction tuning (emu_mc/finetune.py): LoRA under TP / PP against TP = 1, the frozen base, full
fine-tuning, the command under torchrun (2 gloo ranks, TP = 2) from a pretraining checkpoint with its
adapters-only checkpoints, exact resume, the merged export, and bad configs. The adapters' math in one
process: tests/model/test_lora.py."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from emu_mc.config import config_to_dict, load_config
from emu_mc.model.lora import LoRASettings, is_adapter
from tests.train.test_pretrain import read_metrics
from tests.torchrun_utils import REPO_ROOT, torchrun

WORKER = "tests/train/workers/lora_worker.py"
FINETUNE = "emu_mc/finetune.py"
CONFIG = str(REPO_ROOT / "configs" / "emu_i_tiny.yaml")
DROPOUT = {"mode": "lora", "lora_dropout": 0.05}
NO_DROPOUT = {"mode": "lora", "lora_dropout": 0.0}
# name: (tp, pp, finetune section, config overrides, the run it must equal)
LAYOUTS = {
    "ref": (1, 1, DROPOUT, [], None),
    "tp2": (2, 1, DROPOUT, [], "ref"),
    "tp2_recompute": (2, 1, DROPOUT, ["--train.recompute_activations", "true"], "ref"),
    "ref_no_dropout": (1, 1, NO_DROPOUT, [], None),
    "pp2": (1, 2, NO_DROPOUT, [], "ref_no_dropout"),  # PP stages draw their own dropout masks
}
LOSS_RTOL, GRAD_ATOL, GRAD_RTOL = 1e-5, 1e-6, 1e-4  # fp32; TP reorders sums
RUN_ARGS = ["--train.steps", 10, "--train.checkpoint_every", 5, "--parallel.tensor_parallel", 2,
            "--optim.lr", 1e-2, "--optim.warmup_steps", 1]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_layouts")
    runs = [dict(name=name, tp=tp, pp=pp, finetune=ft, set=overrides) for name, (tp, pp, ft, overrides, _) in
            LAYOUTS.items()]
    runs.append(dict(name="full_tp2", tp=2, pp=1, finetune={"mode": "full"}, build_only=True))
    torchrun(WORKER, ["--init", root / "init", "--save-init", "--out", root, "--runs", json.dumps(runs)], nproc=2,
             timeout=300)
    return root


def adapter_grads(path, dropout, special_ids, tokenizer):
    """A layout's adapter gradients, resharded into a TP = 1 model: {name: tensor}."""
    from megatron.core import dist_checkpointing

    from emu_mc.checkpoint import checkpointed_model_state
    from emu_mc.model.emu import EmuModel

    model = EmuModel(load_config("configs/tiny.yaml").model, special_ids, len(tokenizer),
                     lora=LoRASettings(16, 16.0, dropout))
    return dist_checkpointing.load(checkpointed_model_state(model), str(path))


@pytest.mark.parametrize("name", [n for n, layout in LAYOUTS.items() if layout[-1]])
def test_lora_layouts_give_the_tp1_loss_and_adapter_gradients(layouts, name, single_process_world, special_ids,
                                                             tokenizer):
    ref_name = LAYOUTS[name][-1]
    ours, ref = (json.loads((layouts / n / "result.json").read_text()) for n in (name, ref_name))
    assert ours[0]["loss"] == pytest.approx(ref[0]["loss"], rel=LOSS_RTOL)
    dropout = LAYOUTS[name][2]["lora_dropout"]
    got, expected = (adapter_grads(layouts / n / "grads", dropout, special_ids, tokenizer) for n in (name, ref_name))
    assert got.keys() == expected.keys() and len(got) == 2 * 8  # A and B of q, k, v, o in 2 layers
    for key, grad in expected.items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(got[key], grad, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=key)
    print(f"{name} vs {ref_name}: loss {ours[0]['loss']:.6f} / {ref[0]['loss']:.6f}")


def over_ranks(ranks, key):
    """The union over ranks of a list each rank reports (the distributed optimizer holds a DP shard)."""
    return sorted({name for rank in ranks for name in rank[key]})


def test_lora_trains_only_the_adapters(layouts):
    for name in LAYOUTS:
        ranks = json.loads((layouts / name / "result.json").read_text())
        adapters = [n for n in over_ranks(ranks, "all") if is_adapter(n)]
        assert adapters and over_ranks(ranks, "trainable") == adapters == over_ranks(ranks, "optimizer"), name
        for rank in ranks:  # after 3 optimizer steps
            assert rank["base_identical"] and rank["adapters_moved"] and rank["tp_replicas_identical"], name
            assert ("merged_loss" in rank) == (LAYOUTS[name][1] == 1), name
            if "merged_loss" in rank:  # merging each TP shard in place changes no result
                assert rank["merged_loss"][1] == pytest.approx(rank["merged_loss"][0], rel=1e-6), name


def test_full_mode_trains_every_parameter(layouts):
    ranks = json.loads((layouts / "full_tp2" / "result.json").read_text())
    assert not any(is_adapter(n) for n in over_ranks(ranks, "all"))
    assert over_ranks(ranks, "trainable") == over_ranks(ranks, "all") == over_ranks(ranks, "optimizer")


@pytest.fixture(scope="module")
def base(tmp_path_factory, single_process_world, special_ids, tokenizer):
    """A pretraining run directory of the tiny model (random weights), as emu_mc/pretrain.py writes one."""
    from emu_mc.checkpoint import Checkpointer
    from emu_mc.model.emu import EmuModel

    out = tmp_path_factory.mktemp("base") / "run"
    cfg = load_config("configs/tiny.yaml", ["--train.out_dir", str(out)])
    torch.manual_seed(0)
    model = EmuModel(cfg.model, special_ids, len(tokenizer))
    Checkpointer(str(out), keep=1).save(3, {"model": model.sharded_state_dict()}, {},
                                        {"config": config_to_dict(cfg), "tp": 1, "pp": 1, "dp": 1,
                                         "vocab_size": len(tokenizer)})
    return out


def finetune_args(out, base, *extra):
    return ["--config", CONFIG, "--model.init_from", base, "--train.out_dir", out, *RUN_ARGS, *extra]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base):
    out = tmp_path_factory.mktemp("lora") / "run"
    torchrun(FINETUNE, finetune_args(out, base), nproc=2, timeout=300)
    return out, read_metrics(out)


def test_lora_run_lowers_the_loss_and_checkpoints_the_adapters_alone(lora_run, base):
    from megatron.core import dist_checkpointing

    out, metrics = lora_run
    assert sorted(metrics) == list(range(1, 11))
    first, last = (sum(metrics[s]["loss"] for s in steps) / 3 for steps in ((1, 2, 3), (8, 9, 10)))
    print(f"LoRA loss: first 3 steps {first:.4f}, last 3 {last:.4f}")
    assert last < first - 0.05
    step_dir = out / "checkpoints" / "step_000010"
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["config"]["model"]["init_from"] == str(base / "checkpoints" / "step_000003")  # pinned, absolute
    assert len(meta["base"]) == 16  # the base's identity
    model_keys = [k for k in dist_checkpointing.load_tensors_metadata(str(step_dir)) if k.startswith("llm.")]
    assert model_keys and all(is_adapter(k) for k in model_keys)


def test_a_resumed_lora_run_repeats_the_uninterrupted_one(lora_run, base):
    out, metrics = lora_run
    resumed = out.parent / "resumed"
    shutil.copytree(out / "checkpoints" / "step_000005", resumed / "checkpoints" / "step_000005")
    (resumed / "checkpoints" / "latest").write_text("step_000005")
    proc = torchrun(FINETUNE, finetune_args(resumed, base), nproc=2, timeout=300)
    assert "resumed from" in proc.stdout
    again = read_metrics(resumed)
    assert sorted(again) == list(range(6, 11))
    for step in range(6, 11):
        assert again[step]["loss"] == pytest.approx(metrics[step]["loss"], rel=1e-6), step


def test_the_merged_export_loads_as_a_pretrained_model_with_the_adapter_models_logits(lora_run, tmp_path,
                                                                                     single_process_world):
    from emu_mc.checkpoint import Checkpointer, checkpointed_model_state, load_model_state
    from emu_mc.config import config_from_dict
    from emu_mc.convert import load_pretrained
    from emu_mc.convert.__main__ import main as convert_main
    from emu_mc.inference.loading import load_emu
    from emu_mc.model.emu import EmuModel
    from emu_mc.tokenizer import load_tokenizer, special_token_ids
    from tests.convert.llm_helpers import stage_forward

    out, _ = lora_run
    assert convert_main(["export", "--checkpoint", str(out), "--to", "emu", "--out", str(tmp_path / "merged")]) == 0
    merged = load_emu(str(tmp_path / "merged"))  # what generation and model.init_from load
    step_dir = str(out / "checkpoints" / "step_000010")
    cfg = config_from_dict(json.loads(Path(step_dir, "meta.json").read_text())["config"])
    tok = load_tokenizer(cfg.model.tokenizer)
    adapted = EmuModel(cfg.model, special_token_ids(tok), len(tok), lora=LoRASettings.of(cfg.finetune)).eval()
    load_pretrained(adapted, cfg.model)
    state, _, _ = Checkpointer(str(out), keep=1).load(step_dir, {"model": checkpointed_model_state(adapted)},
                                                      same_layout=False)
    load_model_state(adapted, state["model"])
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [stage_forward(m.llm, ids)[..., :len(tok)] for m in (merged.model, adapted)]  # padding rows aside
    diff = (logits[0] - logits[1]).abs().max().item()
    print(f"merged export vs adapter model: max abs logit diff {diff:.2e}")
    assert diff <= 1e-5

    cfg.model.init_from = str(tmp_path / "merged")  # the export as the base of the next fine-tuning run
    again = EmuModel(cfg.model, special_token_ids(tok), len(tok), lora=LoRASettings.of(cfg.finetune))
    load_pretrained(again, cfg.model)
    merged_weights = merged.model.state_dict()
    for name, tensor in again.state_dict().items():
        if is_adapter(name):
            assert not tensor.any(), name  # left as built: zero until init_adapters
        elif isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, merged_weights[name]), name


def test_adapters_follow_a_moved_base_and_refuse_a_changed_one(lora_run, base, tmp_path, single_process_world):
    from emu_mc.checkpoint import CheckpointConfigError, load_checkpoint_model

    out, _ = lora_run
    moved = tmp_path / "moved_base"
    shutil.copytree(base, moved)
    step = tmp_path / "lora" / "checkpoints" / "step_000010"
    shutil.copytree(out / "checkpoints" / "step_000010", step)
    meta = json.loads((step / "meta.json").read_text())
    meta["config"]["model"]["init_from"] = str(moved / "checkpoints" / "step_000003")
    (step / "meta.json").write_text(json.dumps(meta))
    load_checkpoint_model(str(step))
    base_meta = moved / "checkpoints" / "step_000003" / "meta.json"
    base_meta.write_text(base_meta.read_text().replace('"step": 3', '"step": 4'))  # another base now
    with pytest.raises(CheckpointConfigError, match="trained on other base weights"):
        load_checkpoint_model(str(step))


@pytest.mark.parametrize("args,message", [
    (["--finetune.mode", "partial"], "finetune.mode: 'partial' is not one of ['lora', 'full']"),
    (["--finetune.lora_dropout", "1.0"], "finetune.lora_dropout: must be in [0, 1)"),
    (["--model.init_from", "''"], "model.init_from: must be the weights to fine-tune"),
    (["--model.init_from", "/nonexistent/run"], "model.init_from: '/nonexistent/run' is not a directory"),
], ids=["mode", "dropout", "no_base", "missing_base"])
def test_a_bad_finetune_config_is_one_line_and_exit_2(args, message, capsys, tmp_path):
    from emu_mc.finetune import main

    assert main(["--config", CONFIG, "--train.out_dir", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: ") and message in err and "\n" not in err, err


def test_pretraining_refuses_a_finetune_config_and_a_lora_run_is_no_base(lora_run, capsys):
    from emu_mc.finetune import main as finetune_main
    from emu_mc.pretrain import main as pretrain_main

    assert pretrain_main(["--config", CONFIG]) == 2
    assert "run emu_mc/finetune.py with it" in capsys.readouterr().err
    out, _ = lora_run
    assert finetune_main(["--config", CONFIG, "--model.init_from", str(out), "--train.out_dir", str(out) + "2"]) == 2
    err = capsys.readouterr().err
    assert "holds LoRA adapters only" in err and "convert export" in err
