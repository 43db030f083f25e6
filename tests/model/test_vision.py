"""The EVA-CLIP attention has q and v biases only, as released: the k third of qkv.bias is never read."""
import torch

from emu_mc.config import VisionConfig
from emu_mc.model.vision import VisionTransformer


def test_k_bias_is_not_read_and_gets_no_gradient():
    cfg = VisionConfig(image_size=16, patch_size=8, width=32, num_layers=1, num_heads=4, mlp_hidden=64)
    torch.manual_seed(0)
    model = VisionTransformer(cfg).double()
    bias = model.blocks[0].attn.qkv.bias
    with torch.no_grad():
        bias.normal_()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out = model(images)
    out.square().sum().backward()
    assert torch.equal(bias.grad[32:64], torch.zeros(32, dtype=torch.float64))
    assert bias.grad[:32].abs().max() > 0 and bias.grad[64:].abs().max() > 0
    with torch.no_grad():
        bias[32:64] += 5.0
        assert torch.equal(model(images), out.detach())
