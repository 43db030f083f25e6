"""Causal Transformer (docs/model.md, component 3): a T5-decoder-style stack over learned queries.

Each layer: causal self-attention over the queries with T5 relative-position bias (one bucket table
shared by all layers, as in T5), cross-attention to the normalised visual tokens, ReLU FFN; T5 RMS
norms before each, residual after each. Then a final norm and a projection to the LLM width.
All attention goes through one function, `attention_fn(impl)`, the seam for the Triton kernel.
"""
import logging
from typing import Callable

import torch
import torch.nn as nn

from emu_mc.config import ResamplerConfig
from emu_mc.kernels.resampler_attention import resampler_attention_reference

log = logging.getLogger("emu_mc.model")


def attention_fn(impl: str) -> Callable:
    """The resampler's attention: 'triton' (fused kernel), 'reference' (PyTorch), 'auto' (Triton on CUDA)."""
    if impl == "reference" or (impl == "auto" and not torch.cuda.is_available()):
        return resampler_attention_reference
    from emu_mc.kernels.resampler_attention import resampler_attention

    return resampler_attention


class MultiHeadAttention(nn.Module):
    """T5 attention: no biases, no 1/sqrt(d) scaling. q from d_model, k/v from `kv_width`."""

    def __init__(self, d_model: int, kv_width: int, num_heads: int, d_kv: int):
        super().__init__()
        self.num_heads, self.d_kv = num_heads, d_kv
        self.q = nn.Linear(d_model, num_heads * d_kv, bias=False)
        self.k = nn.Linear(kv_width, num_heads * d_kv, bias=False)
        self.v = nn.Linear(kv_width, num_heads * d_kv, bias=False)
        self.o = nn.Linear(num_heads * d_kv, d_model, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.d_kv).transpose(1, 2)  # [B, H, L, D]

    def forward(self, x, kv, attend: Callable, *, causal: bool, rel_bias=None, max_distance: int = 128,
                dropout_p: float = 0.0):
        """x [B, Lq, d_model], kv [B, Lk, kv_width] -> [B, Lq, d_model]; dropout_p on the attention
        probabilities, as T5 does."""
        out = attend(self._heads(self.q(x)), self._heads(self.k(kv)), self._heads(self.v(kv)),
                     causal=causal, rel_bias=rel_bias, max_distance=max_distance, scale=1.0, dropout_p=dropout_p)
        return self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class ResamplerLayer(nn.Module):
    def __init__(self, cfg: ResamplerConfig, visual_width: int):
        super().__init__()
        self.self_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.d_model, cfg.num_heads, cfg.d_kv)
        self.cross_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.cross_attn = MultiHeadAttention(cfg.d_model, visual_width, cfg.num_heads, cfg.d_kv)
        self.ff_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.max_distance = cfg.max_distance

    def forward(self, x, visual, rel_bias, attend):
        attn_dropout = self.dropout.p if self.training else 0.0
        h = self.self_norm(x)
        x = x + self.dropout(self.self_attn(h, h, attend, causal=True, rel_bias=rel_bias,
                                            max_distance=self.max_distance, dropout_p=attn_dropout))
        x = x + self.dropout(self.cross_attn(self.cross_norm(x), visual, attend, causal=False,
                                             dropout_p=attn_dropout))
        h = self.wo(self.dropout(torch.relu(self.wi(self.ff_norm(x)))))
        return x + self.dropout(h)


class CausalResampler(nn.Module):
    """visual tokens [N, T, visual_width] -> visual embeddings [N, num_queries, out_width], causal in query order."""

    def __init__(self, cfg: ResamplerConfig, visual_width: int, out_width: int, init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, cfg.d_model) * init_std)
        self.rel_bias = nn.Parameter(torch.randn(cfg.num_buckets, cfg.num_heads) * init_std)  # [buckets, heads]
        self.layers = nn.ModuleList(ResamplerLayer(cfg, visual_width) for _ in range(cfg.num_layers))
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(cfg.d_model, out_width, bias=True)
        self.attend = attention_fn(cfg.attention_impl)
        log.info("resampler attention: %s", self.attend.__name__)
        self._init_t5()

    @torch.no_grad()
    def _init_t5(self) -> None:
        """T5's initialisation (HF T5PreTrainedModel._init_weights, factor 1), as the release's causal
        former gets it: normal with std d_model^-0.5 for k, v, wi and the relative bias,
        (d_model d_kv)^-0.5 for q, (heads d_kv)^-0.5 for o, d_ff^-0.5 for wo (the cross-attention's k/v
        too, though they read the vision width); norms at 1. The queries (std init_std, 0.02 as
        released) and the output projection (nn.Linear's default) are not T5's."""
        d_model, d_kv, heads = self.cfg.d_model, self.cfg.d_kv, self.cfg.num_heads
        self.rel_bias.normal_(0.0, d_model ** -0.5)
        for layer in self.layers:
            for attn in (layer.self_attn, layer.cross_attn):
                attn.q.weight.normal_(0.0, (d_model * d_kv) ** -0.5)
                attn.k.weight.normal_(0.0, d_model ** -0.5)
                attn.v.weight.normal_(0.0, d_model ** -0.5)
                attn.o.weight.normal_(0.0, (heads * d_kv) ** -0.5)
            layer.wi.weight.normal_(0.0, d_model ** -0.5)
            layer.wo.weight.normal_(0.0, self.cfg.d_ff ** -0.5)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.queries.to(visual.dtype).expand(visual.shape[0], -1, -1))
        for layer in self.layers:
            x = layer(x, visual, self.rel_bias, self.attend)
        return self.proj(self.dropout(self.final_norm(x)))
