"""Damaged or mismatched checkpoints fail with ConversionError naming the tensor, file or field."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from emu_mc.config import LLMConfig
from emu_mc.convert import ConversionError, hf_to_emu, load_llm_state, read_llm_checkpoint
from emu_mc.convert.__main__ import main
from emu_mc.convert.llm_format import META_FILE, WEIGHTS_FILE
from emu_mc.model.llm import build_llm
from tests.convert.llm_helpers import make_hf_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    make_hf_llama(d)
    return d


@pytest.fixture
def emu_dir(hf_dir, tmp_path):
    hf_to_emu(str(hf_dir), str(tmp_path / "emu"))
    return tmp_path / "emu"


def edit_safetensors(path, edit):
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def copy_hf(hf_dir, dst):
    dst.mkdir()
    for f in hf_dir.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_hf_missing_tensor(hf_dir, tmp_path, capsys):
    d = copy_hf(hf_dir, tmp_path / "hf")
    edit_safetensors(d / "model.safetensors", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    assert main(["hf-to-emu", "--hf", str(d), "--out", str(tmp_path / "out")]) == 2
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in capsys.readouterr().err


def test_hf_wrong_shape(hf_dir, tmp_path):
    d = copy_hf(hf_dir, tmp_path / "hf")
    edit_safetensors(d / "model.safetensors", lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*expected shape \(32, 64\), found \(64, 64\)"):
        hf_to_emu(str(d), str(tmp_path / "out"))


def test_hf_truncated_file(hf_dir, tmp_path):
    d = copy_hf(hf_dir, tmp_path / "hf")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"model\.safetensors: unreadable or damaged"):
        hf_to_emu(str(d), str(tmp_path / "out"))


def test_hf_unsupported_rope_scaling(hf_dir, tmp_path):
    d = copy_hf(hf_dir, tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="rope type 'llama3'"):
        hf_to_emu(str(d), str(tmp_path / "out"))


def test_emu_missing_and_misshaped_tensor(emu_dir):
    name = "decoder.layers.1.self_attention.linear_qkv.weight"
    edit_safetensors(emu_dir / WEIGHTS_FILE, lambda s: s.pop(name))
    with pytest.raises(ConversionError, match=f"missing tensor '{name}'"):
        read_llm_checkpoint(str(emu_dir))
    edit_safetensors(emu_dir / WEIGHTS_FILE, lambda s: s.update({name: torch.zeros(128, 32)}))
    with pytest.raises(ConversionError, match=rf"{name}.*expected shape \(128, 64\), found \(128, 32\)"):
        read_llm_checkpoint(str(emu_dir))


def test_emu_truncated_and_missing_meta(emu_dir):
    data = (emu_dir / WEIGHTS_FILE).read_bytes()
    (emu_dir / WEIGHTS_FILE).write_bytes(data[:100])
    with pytest.raises(ConversionError, match=f"{WEIGHTS_FILE}: unreadable or damaged"):
        read_llm_checkpoint(str(emu_dir))
    (emu_dir / META_FILE).unlink()
    with pytest.raises(ConversionError, match=f"{META_FILE}: missing or invalid"):
        read_llm_checkpoint(str(emu_dir))


def test_load_into_mismatched_model(single_process_world, emu_dir):
    state, cfg, vocab = read_llm_checkpoint(str(emu_dir))
    narrow = build_llm(LLMConfig(**{**cfg.__dict__, "ffn_hidden_size": 128}), 128)
    with pytest.raises(ConversionError, match=r"decoder\.layers\.0\.mlp\.linear_fc1\.weight.*expected shape \(256, 64\), found \(344, 64\)"):
        load_llm_state(narrow, state)
    small_vocab = build_llm(cfg, 64)
    with pytest.raises(ConversionError, match=r"embedding\.word_embeddings\.weight: checkpoint has 100 vocab rows, more than the model's 64"):
        load_llm_state(small_vocab, state)
    deeper = build_llm(LLMConfig(**{**cfg.__dict__, "num_layers": 3}), 128)
    with pytest.raises(ConversionError, match=r"missing tensor 'decoder\.layers\.2\."):
        load_llm_state(deeper, state)


@pytest.mark.parametrize("index_text", ['{"weight_map": {"model.norm.weight": "model-0000', '{"metadata": {}}',
                                        '{"weight_map": {}}', '[1, 2]'])
def test_hf_malformed_index_is_one_line_exit_2(hf_dir, tmp_path, capsys, index_text):
    d = copy_hf(hf_dir, tmp_path / "hf")
    (d / "model.safetensors.index.json").write_text(index_text)
    assert main(["hf-to-emu", "--hf", str(d), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors.index.json: truncated or malformed index" in err, err


@pytest.mark.parametrize("scaling", [{"rope_type": "llama3", "factor": 8.0}, {"type": "default", "rope_theta": 1.0e6}])
def test_hf_rope_parameters_and_rope_scaling_that_disagree_are_refused(hf_dir, tmp_path, scaling):
    d = copy_hf(hf_dir, tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    cfg["rope_scaling"] = scaling
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="rope_parameters .* and rope_scaling .* disagree"):
        hf_to_emu(str(d), str(tmp_path / "out"))


def test_hf_rope_parameters_and_rope_scaling_that_agree_convert(hf_dir, tmp_path):
    d = copy_hf(hf_dir, tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    cfg["rope_scaling"] = {"type": "default"}
    (d / "config.json").write_text(json.dumps(cfg))
    assert hf_to_emu(str(d), str(tmp_path / "out"))[0].rope_theta == 10000.0
