"""EVA-CLIP-style vision transformer (docs/model.md, component 1): all tokens out, no final norm, no pooling."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from emu_mc.config import VisionConfig


class Attention(nn.Module):
    """EVA-CLIP attention: q and v biases, no k bias (as released). The biases are held in one `qkv.bias`
    [3 width] (the layout of every checkpoint written so far) whose k third the forward never reads: it
    gets no gradient and stays as loaded (zero from the converters), and a k bias would only shift all
    of a query's scores equally, which softmax ignores."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q_bias, _, v_bias = self.qkv.bias.chunk(3)
        bias = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg.width, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.width, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """images [N, 3, S, S] float -> tokens [N, 1 + (S/patch)^2, width] (CLS first).

    `recompute`: each block's activations are recomputed in backward (activation checkpointing) when
    gradients are enabled; same values and gradients, one block's activations held at a time."""

    def __init__(self, cfg: VisionConfig, init_std: float = 0.02, recompute: bool = False):
        super().__init__()
        self.cfg, self.recompute = cfg, recompute
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        nn.init.normal_(self.cls_token, std=init_std)
        nn.init.normal_(self.pos_embed, std=init_std)

    @property
    def num_tokens(self) -> int:
        return self.pos_embed.shape[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [N, patches, width]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        recompute = self.recompute and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return x
