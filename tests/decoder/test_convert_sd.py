"""python -m emu_mc.convert sd-to-decoder on a tiny local SD-like directory built here."""
import os

import pytest
import torch

from emu_mc.convert.__main__ import main as convert_main
from emu_mc.convert.errors import ConversionError
from emu_mc.convert.sd_decoder import sd_to_decoder


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny SD v1.x-shaped directory: UNet with CLIP-width (32) cross-attention, VAE, scheduler, and
    stand-ins for the text encoder and tokenizer."""
    from emu_mc.inference.tiny_decoder import write_tiny_decoder

    root = str(tmp_path_factory.mktemp("sd") / "sd")
    write_tiny_decoder(root, cross_attention_dim=32, sample_size=8)
    for sub in ("text_encoder", "tokenizer"):
        os.makedirs(os.path.join(root, sub))
        open(os.path.join(root, sub, "config.json"), "w").write("{}")
    return root


def test_sd_to_decoder(sd_dir, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from emu_mc.inference import VisualDecoder

    out = str(tmp_path / "emu-decoder")
    assert convert_main(["sd-to-decoder", "--sd", sd_dir, "--llm-width", "64", "--out", out]) == 0
    assert "new cross-attention k/v layers" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["emu_mc_decoder.json", "scheduler", "unet", "vae"]
    old = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet", low_cpu_mem_usage=False).state_dict()
    new = UNet2DConditionModel.from_pretrained(out, subfolder="unet", low_cpu_mem_usage=False)
    assert new.config.cross_attention_dim == 64
    replaced = 0
    for name, tensor in new.state_dict().items():
        if name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            replaced += 1
            assert tensor.shape == (old[name].shape[0], 64)
            assert tensor.abs().max() <= 64 ** -0.5  # nn.Linear default: U(-1/sqrt(in), 1/sqrt(in))
        else:
            assert torch.equal(tensor, old[name]), name
    assert replaced == 8  # 4 cross-attention blocks (down, mid, 2 up) x (k, v) in the tiny UNet
    decoder = VisualDecoder.load(out, llm_width=64)  # generation loads the result
    assert decoder.unet.config.cross_attention_dim == 64


def test_sd_to_decoder_bad_inputs(sd_dir, tmp_path, capsys):
    with pytest.raises(ConversionError, match="no unet/ directory"):
        sd_to_decoder(str(tmp_path), 64, str(tmp_path / "a"))
    with pytest.raises(ConversionError, match="--llm-width 0"):
        sd_to_decoder(sd_dir, 0, str(tmp_path / "b"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert convert_main(["sd-to-decoder", "--sd", sd_dir, "--llm-width", "64", "--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not empty" in err
