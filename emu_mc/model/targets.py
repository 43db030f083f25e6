"""Targets of the Emu objective, position by position (docs/model.md "The objective").

Text: position p predicts token p+1 unless that token is pad, [IMG], <image> or [/IMG], lies in
another document (segment) or p is the last position -> IGNORE_INDEX.
Regression: positions whose token is [IMG] or <image> predict the input embedding of position p+1
(the next <image> slot's visual embedding; for the last slot, the [/IMG] token embedding).
With a loss mask (chat batches, emu_mc/batch.py) both count only where token p+1 has mask True: the
assistant's answers and their </s> in a chat document (its images are inputs: no regression), every
token of a pretraining document.
"""
import dataclasses
from typing import Optional

import torch

from emu_mc.batch import Batch
from emu_mc.tokenizer import SpecialTokenIds

IGNORE_INDEX = -100


def _next_masked(loss_mask: torch.Tensor) -> torch.Tensor:
    """loss_mask [B, S] bool -> [B, S] bool: position p's next token is not a target (last column True)."""
    out = torch.ones_like(loss_mask)
    out[:, :-1] = ~loss_mask[:, 1:]
    return out


def text_targets(input_ids: torch.Tensor, segment_ids: torch.Tensor, ids: SpecialTokenIds,
                 loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """input_ids, segment_ids [B, S] long (loss_mask [B, S] bool or None) -> next-token targets [B, S]
    long, IGNORE_INDEX where none."""
    nxt = torch.full_like(input_ids, IGNORE_INDEX)
    nxt[:, :-1] = input_ids[:, 1:]
    no_text = torch.zeros_like(input_ids, dtype=torch.bool)
    for special in (ids.pad, ids.img_begin, ids.img_slot, ids.img_end):
        no_text |= nxt == special
    same_doc = torch.zeros_like(no_text)
    same_doc[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] >= 0)
    if loss_mask is not None:
        no_text |= _next_masked(loss_mask)
    return nxt.masked_fill(no_text | ~same_doc, IGNORE_INDEX)


def regression_mask(input_ids: torch.Tensor, ids: SpecialTokenIds, loss_mask: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """[B, S] bool: positions whose token is [IMG] or <image> (num_queries + 1 per image), those whose
    next token is masked out excluded."""
    mask = (input_ids == ids.img_begin) | (input_ids == ids.img_slot)
    return mask if loss_mask is None else mask & ~_next_masked(loss_mask)


def flat_text_targets(batch: Batch, ids: SpecialTokenIds) -> torch.Tensor:
    """[B * S] long: `text_targets` in s-major flat order (s * B + b), the loss's row order."""
    return text_targets(batch.input_ids, batch.segment_ids, ids, batch.loss_mask).t().reshape(-1)


def regression_rows(batch: Batch, ids: SpecialTokenIds) -> torch.Tensor:
    """[R] long: the s-major flat positions (s * B + b) that regress the next input embedding."""
    return regression_mask(batch.input_ids, ids, batch.loss_mask).t().reshape(-1).nonzero().squeeze(1)


def with_loss_rows(batch: Batch, ids: SpecialTokenIds) -> Batch:
    """The batch (on the host, before it moves to the GPU) with `text_targets`, `text_rows` and
    `regression_rows` set."""
    targets = flat_text_targets(batch, ids)
    return dataclasses.replace(batch, text_targets=targets,
                               text_rows=(targets != IGNORE_INDEX).nonzero().squeeze(1),
                               regression_rows=regression_rows(batch, ids))


def check_image_blocks(input_ids: torch.Tensor, num_images: int, num_queries: int, ids: SpecialTokenIds) -> None:
    """Raise ValueError unless every [IMG] is followed by exactly num_queries <image> and a [/IMG],
    and the batch holds one image per block."""
    n_begin = int((input_ids == ids.img_begin).sum())
    n_slots = int((input_ids == ids.img_slot).sum())
    n_end = int((input_ids == ids.img_end).sum())
    if n_slots != num_queries * num_images or n_begin != num_images or n_end != num_images:
        raise ValueError(
            f"image placeholders do not match the images: {num_images} images need "
            f"{num_images} [IMG], {num_queries * num_images} <image> and {num_images} [/IMG] tokens; "
            f"the batch has {n_begin}, {n_slots} and {n_end}"
        )
    if num_images == 0:
        return
    b, p = (input_ids == ids.img_begin).nonzero(as_tuple=True)
    offsets = torch.arange(1, num_queries + 2, device=input_ids.device)
    cols = p[:, None] + offsets  # [num_images, num_queries + 1]
    if int(cols.max()) >= input_ids.shape[1]:
        raise ValueError("an image block is cut off by the end of its row")
    block = input_ids[b[:, None], cols]
    ok = (block[:, :-1] == ids.img_slot).all(1) & (block[:, -1] == ids.img_end)
    if not bool(ok.all()):
        raise ValueError(
            f"each [IMG] must be followed by exactly {num_queries} <image> tokens and [/IMG]; "
            f"rows {b[~ok].tolist()} violate this"
        )
