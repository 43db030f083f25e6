"""python -m emu_mc.convert export: a pretraining checkpoint written by PP = 2 (the demo's config and
sample data, 2 steps) -> our whole-model format, loaded back by model.init_from, and -> an HF LLaMA
directory whose logits match our LLM's."""
import pytest
import torch

from emu_mc.config import ConfigError, load_config
from emu_mc.convert import ConversionError, load_pretrained
from emu_mc.convert.__main__ import main as convert_main
from emu_mc.convert.export import export_checkpoint, load_checkpoint_model, resolve_step_dir
from emu_mc.convert.llm_format import EMBEDDING, OUTPUT
from emu_mc.model.emu import EmuModel
from tests.convert.llm_helpers import stage_forward
from tests.torchrun_utils import REPO_ROOT, torchrun

TINY = str(REPO_ROOT / "configs" / "tiny.yaml")
VOCAB_ROWS = ("llm." + EMBEDDING, "llm." + OUTPUT)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    torchrun("emu_mc/pretrain.py", ["--config", TINY, "--train.out_dir", out, "--train.steps", 2,
                                    "--parallel.pipeline_parallel", 2], nproc=2, timeout=300)
    return str(out)


@pytest.fixture(scope="module")
def trained(run_dir, single_process_world):
    """The checkpoint's whole model, loaded in this process (what export reads)."""
    return load_checkpoint_model(resolve_step_dir(run_dir))


def test_export_emu_is_what_model_init_from_loads(run_dir, trained, tmp_path):
    model, cfg, tokenizer, _ = trained
    assert convert_main(["export", "--checkpoint", run_dir, "--to", "emu", "--out", str(tmp_path / "emu")]) == 0
    cfg = load_config(TINY, ["--model.init_from", str(tmp_path / "emu")])
    fresh = EmuModel(cfg.model, model.ids, len(tokenizer))
    load_pretrained(fresh, cfg.model)
    ours, theirs = model.state_dict(), fresh.state_dict()
    tensors = [k for k, v in ours.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")]
    assert {k.split(".")[0] for k in tensors} == {"vision", "ln_visual", "resampler", "llm", "regress_head"}
    for name in tensors:
        expected, got = ours[name], theirs[name]
        if name in VOCAB_ROWS:  # the export keeps the tokenizer's rows; padding rows start at zero
            expected, got = expected[: len(tokenizer)], got[: len(tokenizer)]
            assert not theirs[name][len(tokenizer):].any()
        assert torch.equal(expected, got), name

    cfg.model.resampler.num_layers = 3
    with pytest.raises(ConversionError, match=r"differ in resampler.num_layers: 2 vs 3"):
        load_pretrained(EmuModel(cfg.model, model.ids, len(tokenizer)), cfg.model)


def test_export_hf_matches_our_llm(run_dir, trained, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, _, tokenizer, _ = trained
    export_checkpoint(run_dir + "/checkpoints", "hf", str(tmp_path / "hf"))
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert len(AutoTokenizer.from_pretrained(tmp_path / "hf")) == len(tokenizer) == hf.config.vocab_size
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    ours = stage_forward(model.llm, ids)[..., : len(tokenizer)]
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_export_of_a_path_without_a_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    assert convert_main(["export", "--checkpoint", str(tmp_path), "--to", "hf", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no pretraining checkpoint there" in err


def test_whole_model_and_component_init_from_exclude_each_other():
    with pytest.raises(ConfigError, match="model.init_from: must be empty when model.llm.init_from"):
        load_config(TINY, ["--model.init_from", "a", "--model.llm.init_from", "b"])
