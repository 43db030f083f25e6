"""Resampler attention: causal self-attention with a T5 relative-position bias, and cross-attention.

Shapes: q [B, H, Lq, D], k/v [B, H, Lk, D]; output [B, H, Lq, D] in q's dtype.
`rel_bias` is the per-head bucket table [num_buckets, H] of T5 (unidirectional bucketing, as in a
T5 decoder); the bias added to score (i, j) is rel_bias[bucket(j - i), h].
`causal` masks key j for query i when j > i (top-left aligned: query i sees keys 0..i).
Scores are `scale * q @ k^T` (T5 uses scale 1.0: its init absorbs 1/sqrt(D)).

This file holds the plain PyTorch reference (the fallback and the ground truth of the tests).
"""
import math
from typing import Optional

import torch


def relative_position_bucket(
    relative_position: torch.Tensor, *, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's unidirectional bucketing of `relative_position = key_pos - query_pos` (int tensor).

    Distances to earlier keys n = max(-relative_position, 0): n < num_buckets // 2 get their own
    bucket, larger ones share log-spaced buckets up to max_distance, beyond it the last bucket.
    Later keys (relative_position > 0) all fall in bucket 0. Returns a long tensor, same shape.
    """
    n = torch.clamp(-relative_position, min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    log_ratio = torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return torch.where(is_small, n, large).to(torch.long)


def relative_bias_matrix(
    rel_bias: torch.Tensor, q_len: int, k_len: int, *, max_distance: int = 128
) -> torch.Tensor:
    """Expand the bucket table [num_buckets, H] to the dense bias [H, q_len, k_len] (fp32)."""
    q_pos = torch.arange(q_len, device=rel_bias.device)[:, None]
    k_pos = torch.arange(k_len, device=rel_bias.device)[None, :]
    buckets = relative_position_bucket(k_pos - q_pos, num_buckets=rel_bias.shape[0], max_distance=max_distance)
    return rel_bias.float()[buckets].permute(2, 0, 1)


def resampler_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    rel_bias: Optional[torch.Tensor] = None,
    max_distance: int = 128,
    scale: float = 1.0,
) -> torch.Tensor:
    """Eager attention, fp32 softmax. See the module docstring for shapes and semantics."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    if rel_bias is not None:
        scores = scores + relative_bias_matrix(rel_bias, q_len, k_len, max_distance=max_distance)
    if causal:
        future = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)
