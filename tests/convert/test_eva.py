"""EVA-CLIP -> our VisionTransformer: the converted weights reproduce an independent reference forward
of EVA's ViT (written below from EVA-CLIP's eva_vit_model.py: pre-LN blocks, q_bias/v_bias with no k
bias, softmax(q k^T / sqrt(d)) v, exact GELU MLP, all tokens out) for each accepted layout."""
import pytest
import torch
import torch.nn.functional as F

from emu_mc.config import VisionConfig
from emu_mc.convert import ConversionError, load_vision_state
from emu_mc.convert.__main__ import main
from emu_mc.convert.tensor_files import read_tensor_file, write_safetensors
from emu_mc.model.vision import VisionTransformer

CFG = VisionConfig(image_size=32, patch_size=8, width=64, num_layers=2, num_heads=4, mlp_hidden=256)
ATOL = 1e-5  # fp32


def fake_eva_tower(cfg: VisionConfig, seed: int = 0) -> dict:
    """Random EVA-CLIP vision tower tensors (EVA names, split q/v biases, final norm and head)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, mean=0.0, std=0.2):
        return torch.randn(*shape, generator=g) * std + mean

    w, p, n = cfg.width, cfg.patch_size, (cfg.image_size // cfg.patch_size) ** 2
    tower = {"patch_embed.proj.weight": rand(w, 3, p, p), "patch_embed.proj.bias": rand(w),
             "cls_token": rand(1, 1, w), "pos_embed": rand(1, n + 1, w),
             "norm.weight": rand(w, mean=1.0), "norm.bias": rand(w), "head.weight": rand(10, w), "head.bias": rand(10)}
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        tower.update({
            b + "norm1.weight": rand(w, mean=1.0), b + "norm1.bias": rand(w),
            b + "attn.qkv.weight": rand(3 * w, w), b + "attn.q_bias": rand(w), b + "attn.v_bias": rand(w),
            b + "attn.proj.weight": rand(w, w), b + "attn.proj.bias": rand(w),
            b + "norm2.weight": rand(w, mean=1.0), b + "norm2.bias": rand(w),
            b + "mlp.fc1.weight": rand(cfg.mlp_hidden, w), b + "mlp.fc1.bias": rand(cfg.mlp_hidden),
            b + "mlp.fc2.weight": rand(w, cfg.mlp_hidden), b + "mlp.fc2.bias": rand(w)})
    return tower


def eva_reference(t: dict, images: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """EVA ViT forward from EVA tower tensors: [N, 3, S, S] -> all tokens [N, 1 + P, W]."""
    w, heads, eps = cfg.width, cfg.num_heads, cfg.norm_eps
    x = F.conv2d(images, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([t["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + t["pos_embed"]
    b, n, _ = x.shape
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (w,), t[p + "norm1.weight"], t[p + "norm1.bias"], eps)
        bias = torch.cat([t[p + "attn.q_bias"], torch.zeros(w), t[p + "attn.v_bias"]])
        q, k, v = F.linear(h, t[p + "attn.qkv.weight"], bias).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, n, w), t[p + "attn.proj.weight"], t[p + "attn.proj.bias"])
        h = F.layer_norm(x, (w,), t[p + "norm2.weight"], t[p + "norm2.bias"], eps)
        h = F.linear(F.gelu(F.linear(h, t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"])),
                     t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"])
        x = x + h
    return x


def save_checkpoint(state: dict, path) -> None:
    if str(path).endswith(".safetensors"):
        write_safetensors(str(path), state)
    else:
        torch.save({"model": state}, path)  # EVA-CLIP .pt files may wrap the state dict


LAYOUTS = {  # name: (prefix, file suffix, fuse the qkv bias beforehand)
    "eva-clip": ("visual.", ".pt", False),
    "open_clip-timm-trunk": ("visual.trunk.", ".safetensors", False),
    "timm-fused-bias": ("", ".pth", True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_eva_import_matches_reference(tmp_path, layout):
    prefix, suffix, fuse = LAYOUTS[layout]
    tower = fake_eva_tower(CFG)
    ckpt = {prefix + k: v for k, v in tower.items()}
    if fuse:
        for i in range(CFG.num_layers):
            a = f"blocks.{i}.attn."
            ckpt[a + "qkv.bias"] = torch.cat([ckpt.pop(a + "q_bias"), torch.zeros(CFG.width), ckpt.pop(a + "v_bias")])
    if prefix:  # a CLIP checkpoint: the text tower and logit scale lie outside the vision prefix
        ckpt.update({"text.token_embedding.weight": torch.zeros(5, 4), "logit_scale": torch.ones(())})
    save_checkpoint(ckpt, tmp_path / f"eva{suffix}")
    out = tmp_path / "vision.safetensors"
    assert main(["eva-to-emu", "--eva", str(tmp_path / f"eva{suffix}"), "--out", str(out)]) == 0

    vision = VisionTransformer(CFG).eval()
    load_vision_state(vision, read_tensor_file(str(out)))
    images = torch.randn(2, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (vision(images) - eva_reference(tower, images, CFG)).abs().max().item()
    assert diff <= ATOL, diff


def test_unsupported_eva_tensor_is_named(tmp_path):
    ckpt = {"visual." + k: v for k, v in fake_eva_tower(CFG).items()}
    ckpt["visual.blocks.1.gamma_1"] = torch.ones(CFG.width)  # layer scale: not in Emu-1's EVA-CLIP
    save_checkpoint(ckpt, tmp_path / "eva.pt")
    with pytest.raises(ConversionError, match=r"blocks\.1\.gamma_1"):
        from emu_mc.convert import eva_to_emu
        eva_to_emu(str(tmp_path / "eva.pt"), str(tmp_path / "out.safetensors"))


def test_vision_shape_mismatch_is_named(tmp_path):
    other = VisionConfig(**{**CFG.__dict__, "image_size": 48})  # pos_embed for a 6x6 grid
    ckpt = {"visual." + k: v for k, v in fake_eva_tower(other).items()}
    save_checkpoint(ckpt, tmp_path / "eva.pt")
    assert main(["eva-to-emu", "--eva", str(tmp_path / "eva.pt"), "--out", str(tmp_path / "v.safetensors")]) == 0
    with pytest.raises(ConversionError, match=r"pos_embed.*expected shape \(1, 17, 64\), found \(1, 37, 64\)"):
        load_vision_state(VisionTransformer(CFG), read_tensor_file(str(tmp_path / "v.safetensors")))
