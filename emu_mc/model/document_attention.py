"""Causal attention inside packed documents, without an S x S mask: the LLM's attention backends.

A row packs documents back to back, then padding (emu_mc/batch.py: segment ids 0, 1, ..., then -1). A
token attends to itself and the earlier tokens of its own document; padding attends to padding only
(each run on its own in sdpa and flash_varlen; with the same id -1, a right padding run also sees the
left one in flex and the dense mask of `document_causal_mask`), so no document token sees padding and
no softmax row is empty; padding outputs are never used.

Every backend takes megatron's layout, q [S, B, Hq, D] and k, v [S, B, Hkv, D] (Hq a multiple of Hkv:
grouped-query attention, never repeated in memory), and returns [S, B, Hq * D]:
  sdpa          torch scaled_dot_product_attention with is_causal, one call per length bucket of
                documents (lengths in (2^(k-1), 2^k], padded to the bucket's longest): the CPU path
                (flash kernel on CPU, fwd + bwd; saves q, k, v, out, logsumexp, nothing S x S)
  flex          FlexAttention with a document-causal BlockMask, compiled on CUDA; on CPU it runs
                eagerly, forward only (torch has no CPU FlexAttention backward)
  flash_varlen  flash-attn's flash_attn_varlen_func over cu_seqlens (needs flash-attn, CUDA)
  te            Transformer Engine through megatron's TEDotProductAttention (emu_mc/model/llm_attention.py)
  local         megatron's unfused DotProductAttention with the dense [B, 1, S, S] mask (the reference)
`PackedDocuments` holds what a backend needs, built once per micro-batch and shared by every layer.
When every row is one document without padding (unpacked training, or generation's prefill of one
prompt), sdpa and flex run plain causal SDPA over [B, H, S, D] instead: no gathers and no BlockMask,
and on CUDA the flash kernel, which is faster than FlexAttention on the causal pattern.
"""
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from emu_mc.accelerators import importable
from emu_mc.config import ConfigError

ATTENTION_IMPLS = ("auto", "flex", "te", "flash_varlen", "sdpa", "local")
FUSED_IMPLS = ("flex", "te", "flash_varlen", "sdpa")  # the ones that take PackedDocuments
NEEDS_CUDA = ("flex", "te", "flash_varlen")  # for training: no CPU backward (flex) or no CPU build


def installed_backends() -> dict:
    """{optional backend: importable here} for the backends that need an extra package."""
    return {"te": importable("transformer_engine.pytorch"), "flash_varlen": importable("flash_attn")}


def resolve_attention_impl(impl: str, cuda: Optional[bool] = None, training: bool = False) -> str:
    """`model.llm.attention_impl` -> the backend that runs: auto = te > flash_varlen > flex on CUDA,
    sdpa without CUDA. Raises ConfigError for a backend whose package is missing, and with `training`
    for one that has no backward here (flex, te, flash_varlen without CUDA)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"model.llm.attention_impl: {impl!r} is not one of {list(ATTENTION_IMPLS)}")
    have = installed_backends()
    if impl == "auto":
        if not cuda:
            return "sdpa"
        return next((name for name in ("te", "flash_varlen") if have[name]), "flex")
    package = {"te": "transformer-engine", "flash_varlen": "flash-attn"}
    if impl in package and not have[impl]:
        raise ConfigError(f"model.llm.attention_impl: {impl} needs {package[impl]}, which is not installed here; "
                         "use auto (picks the best installed backend), flex, sdpa or local")
    if training and impl in NEEDS_CUDA and not cuda:
        raise ConfigError(f"model.llm.attention_impl: {impl} needs CUDA to train (no CPU backward); use sdpa "
                         "or local on CPU, or auto")
    return impl


def describe(impl: str) -> str:
    """One line for the `accelerators:` log: which attention path a resolved backend is."""
    return {
        "te": "Transformer Engine DotProductAttention, THD packed sequences (cu_seqlens)",
        "flash_varlen": "flash-attn varlen (cu_seqlens)",
        "flex": "FlexAttention, document-causal BlockMask" + (", compiled" if torch.cuda.is_available() else
                                                              ", eager (CPU: forward only)"),
        "sdpa": "torch SDPA per document-length bucket (is_causal)",
        "local": "megatron unfused attention, dense [B, 1, S, S] document mask",
    }[impl]


# --------------------------------------------------------------------------- the documents of a micro-batch


@dataclass
class PackedDocuments:
    """The documents of one micro-batch, in the forms the fused backends need; megatron passes it to
    every layer's core attention as `packed_seq_params` (its attention reads only `qkv_format`: "sbhd"
    leaves q, k, v as they are)."""

    segment_ids: torch.Tensor  # [B, S] long
    cu_seqlens: torch.Tensor  # [N + 1] int32: document starts in b-major flat token order (b * S + s)
    max_seqlen: int
    qkv_format: str = "sbhd"
    block_mask: Optional[object] = None  # flex: torch.nn.attention.flex_attention.BlockMask
    # sdpa: per length bucket, [n_docs, L] long: the flat s-major token index (s * B + b) of slot j of each
    # document; slots past a document's end repeat its last token (their queries are dropped, and
    # causality keeps the real queries off their keys)
    buckets: List[torch.Tensor] = field(default_factory=list)
    inverse: Optional[torch.Tensor] = None  # sdpa: [S * B] long, each token's row in the cat of bucket outputs
    causal_only: bool = False  # every row one document, no padding: plain causal attention (sdpa, flex)

    @classmethod
    def from_segment_ids(cls, segment_ids: torch.Tensor, impl: str) -> "PackedDocuments":
        """segment_ids [B, S] long (documents in order, padding -1 before or after them) -> what `impl` needs."""
        check_segment_ids(segment_ids)
        b, s = segment_ids.shape
        starts, lengths = document_runs(segment_ids)
        cu_seqlens = torch.cat([starts, starts.new_tensor([b * s])]).to(torch.int32)
        docs = cls(segment_ids=segment_ids, cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()),
                   causal_only=starts.numel() == b and bool((segment_ids[:, 0] >= 0).all()))
        if docs.causal_only:
            return docs
        if impl == "flex":
            docs.block_mask = document_block_mask(segment_ids)
        elif impl == "sdpa":
            docs.buckets, docs.inverse = _length_buckets(starts, lengths, b, s)
        return docs


def check_segment_ids(segment_ids: torch.Tensor) -> None:
    """Each row: optional left padding (-1, as generation pads prompts), documents numbered in order
    (non-decreasing ids >= 0), then only padding (-1)."""
    left_padding = (segment_ids >= 0).long().cumsum(1) == 0
    order = torch.where((segment_ids < 0) & ~left_padding, torch.iinfo(torch.long).max, segment_ids)
    if segment_ids.shape[1] > 1 and bool((order[:, 1:] < order[:, :-1]).any()):
        raise ValueError("segment_ids: each row must hold its documents in order (ids 0, 1, ...), padding (-1) "
                         "only before or after them; the packed-document attention needs every document contiguous")


def document_runs(segment_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """segment_ids [B, S] -> (starts, lengths) [N] long of the runs of equal ids (documents, and each row's
    padding run), in b-major flat token order (b * S + s)."""
    b, s = segment_ids.shape
    new_doc = torch.ones_like(segment_ids, dtype=torch.bool)
    new_doc[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = new_doc.reshape(-1).nonzero().squeeze(1)
    return starts, torch.cat([starts, starts.new_tensor([b * s])]).diff()


def _length_buckets(starts: torch.Tensor, lengths: torch.Tensor, b: int, s: int) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Documents (b-major starts/lengths [N]) -> power-of-two length buckets, and for every token (s-major
    flat) its row in the bucket outputs concatenated as [sum n_docs * L, ...]."""
    device = starts.device
    row, col = starts // s, starts % s
    bucket_of = torch.ceil(torch.log2(lengths.double())).long()
    buckets, inverse = [], torch.empty(b * s, dtype=torch.long, device=device)
    offset = 0
    for k in bucket_of.unique().tolist():
        which = (bucket_of == k).nonzero().squeeze(1)
        n, width = which.numel(), int(lengths[which].max())
        slot = torch.arange(width, device=device)
        within = torch.minimum(slot[None, :], lengths[which, None] - 1)  # [n, L]
        pos = col[which, None] + within  # sequence position of each slot
        index = pos * b + row[which, None]  # s-major flat
        real = slot[None, :] < lengths[which, None]
        inverse[index[real]] = offset + torch.arange(n * width, device=device).view(n, width)[real]
        buckets.append(index)
        offset += n * width
    return buckets, inverse


def document_block_mask(segment_ids: torch.Tensor):
    """FlexAttention BlockMask [B, 1, S, S] of the document-causal pattern (blocks wholly outside every
    document are skipped; nothing S x S is kept)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (segment_ids[b, q_idx] == segment_ids[b, kv_idx])

    b, s = segment_ids.shape
    return create_block_mask(document_causal, b, None, s, s, device=segment_ids.device)


# --------------------------------------------------------------------------- backends


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocuments, impl: str,
                       scale: Optional[float] = None) -> torch.Tensor:
    """q [S, B, Hq, D], k/v [S, B, Hkv, D] (same dtype) -> [S, B, Hq * D], attention causal inside each
    document of `docs`. `impl`: sdpa, flex or flash_varlen (te runs in emu_mc/model/llm_attention.py)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if docs.causal_only and impl in ("sdpa", "flex"):
        return causal_attention(q, k, v, scale)
    return {"sdpa": sdpa_attention, "flex": flex_attention, "flash_varlen": flash_varlen_attention}[impl](
        q, k, v, docs, scale)


def causal_attention(q, k, v, scale: float) -> torch.Tensor:
    """Plain causal SDPA on [B, H, S, D] views, for rows that are one document each; shapes as
    `document_attention`."""
    s, b, hq, d = q.shape
    out = F.scaled_dot_product_attention(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), is_causal=True, scale=scale,
                                         enable_gqa=hq != k.shape[2])  # [B, Hq, S, D]
    return out.permute(2, 0, 1, 3).reshape(s, b, hq * d)


def sdpa_attention(q, k, v, docs: PackedDocuments, scale: float) -> torch.Tensor:
    """One SDPA call per length bucket on [n_docs, H, L, D] gathers; shapes as `document_attention`."""
    s, b, hq, d = q.shape
    flat = [x.reshape(s * b, x.shape[2], d) for x in (q, k, v)]
    outs = []
    for index in docs.buckets:
        n, width = index.shape
        qb, kb, vb = (x[index.reshape(-1)].view(n, width, x.shape[1], d).transpose(1, 2) for x in flat)
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=hq != kb.shape[1])
        outs.append(out.transpose(1, 2).reshape(n * width, hq * d))
    return torch.cat(outs)[docs.inverse].view(s, b, hq * d)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False)


def flex_attention(q, k, v, docs: PackedDocuments, scale: float) -> torch.Tensor:
    """FlexAttention on [B, H, S, D] views with the micro-batch's BlockMask; shapes as `document_attention`.
    Compiled on CUDA; eager on CPU (forward only there)."""
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    s, b, hq, d = q.shape
    if not q.is_cuda and not torch.is_grad_enabled():  # CPU flex refuses inputs that require grad
        q, k, v = q.detach(), k.detach(), v.detach()
    with warnings.catch_warnings():  # eager on CPU is deliberate (no CPU backward to compile for)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        flex = _compiled_flex() if q.is_cuda else eager_flex
        out = flex(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), block_mask=docs.block_mask, scale=scale,
                   enable_gqa=hq != k.shape[2])  # [B, Hq, S, D]
    return out.permute(2, 0, 1, 3).reshape(s, b, hq * d)


def to_thd(x: torch.Tensor) -> torch.Tensor:
    """[S, B, H, D] -> [B * S, H, D] (documents contiguous, as cu_seqlens count them)."""
    return x.transpose(0, 1).reshape(-1, x.shape[2], x.shape[3])


def from_thd(x: torch.Tensor, s: int, b: int) -> torch.Tensor:
    """[B * S, H, D] or [B * S, H * D] -> [S, B, H * D]."""
    return x.reshape(b, s, -1).transpose(0, 1).contiguous()


def flash_varlen_attention(q, k, v, docs: PackedDocuments, scale: float) -> torch.Tensor:
    """flash-attn varlen over the micro-batch's cu_seqlens; shapes as `document_attention`."""
    from flash_attn import flash_attn_varlen_func

    s, b = q.shape[:2]
    out = flash_attn_varlen_func(to_thd(q), to_thd(k), to_thd(v), docs.cu_seqlens, docs.cu_seqlens,
                                 docs.max_seqlen, docs.max_seqlen, softmax_scale=scale, causal=True)
    return from_thd(out, s, b)


def document_attention_reference(q, k, v, segment_ids: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Readable reference with the dense document-causal mask (megatron's `local` math): fp32 softmax over
    [B, Hq, S, S]. q [S, B, Hq, D], k/v [S, B, Hkv, D], segment_ids [B, S] -> [S, B, Hq * D] in q's dtype."""
    s, b, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = hq // k.shape[2]
    qh, kh, vh = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [B, H, S, D]
    kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    allowed = torch.ones(s, s, dtype=torch.bool, device=q.device).tril() & (
        segment_ids[:, :, None] == segment_ids[:, None, :])  # [B, S, S]
    scores = (qh @ kh.transpose(-1, -2)).float() * scale
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).to(q.dtype)
    return (probs @ vh).permute(2, 0, 1, 3).reshape(s, b, hq * d)


def causal_pairs(segment_ids: torch.Tensor) -> int:
    """(query, key) pairs inside documents: sum over documents of n (n + 1) / 2, padding excluded.
    segment_ids [B, S] as in emu_mc/batch.py. What attention FLOPs are counted over (emu_mc/metrics.py)."""
    starts, lengths = document_runs(segment_ids)
    real = segment_ids.reshape(-1)[starts] >= 0
    return int((lengths[real] * (lengths[real] + 1) // 2).sum())
