"""The batch format: the one contract between the data pipeline and the model.

A row of `input_ids` holds one or more documents packed back to back, each
`<s> text ... [IMG] <image> x num_queries [/IMG] text ... </s>`, then padding. The images of the
whole batch are stacked in order of appearance (row 0 left to right, then row 1, ...), so the k-th
`[IMG]` block of the batch takes `images[k]`. Text and regression targets are derived from
`input_ids` and `segment_ids` by the model (emu_mc/model/targets.py), not stored here (the training loop
adds them, found on the host: `text_targets`, `text_rows`, `regression_rows`); `loss_mask`
(chat data) narrows them to the tokens that are targets: a text target or a regression target counts
only where the token it predicts has loss_mask True.
"""
from dataclasses import dataclass, fields
from typing import Optional

import torch

from emu_mc.tokenizer import SpecialTokenIds, image_placeholder_ids


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S] long, padded with the pad id
    position_ids: torch.Tensor  # [B, S] long, restarting at 0 for each document
    segment_ids: torch.Tensor  # [B, S] long, document index within its row (0, 1, ...); -1 on padding
    images: torch.Tensor  # [N_img, 3, image_size, image_size] float32, CLIP-normalised
    # [B, S] bool: the token may be a target (chat: the assistant's answers and their </s>; every token
    # of a pretraining document; never padding); None = every token (a batch without chat documents).
    loss_mask: Optional[torch.Tensor] = None
    # Found on the host before the batch moves to the GPU (emu_mc.model.targets.with_loss_rows), so that
    # the model's loss neither computes them again nor waits on the GPU for them; None: the model finds
    # them itself (the CE then runs over every row). In s-major flat order (s * B + b):
    # text_targets [B * S] long, the next-token targets (IGNORE_INDEX where none);
    # text_rows [T] / regression_rows [R] long, the positions with a text / a regression target
    text_targets: Optional[torch.Tensor] = None
    text_rows: Optional[torch.Tensor] = None
    regression_rows: Optional[torch.Tensor] = None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{name: None if value is None else value.to(device, non_blocking=non_blocking)
                        for name, value in moved.items()})

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())


def synthetic_batch(
    ids: SpecialTokenIds,
    *,
    batch_size: int,
    seq_length: int,
    vocab_size: int,
    num_queries: int,
    image_size: int,
    images_per_row: int = 1,
    generator: torch.Generator = None,
) -> Batch:
    """Random text around `images_per_row` image blocks per row, one document per row, then padding.

    Token ids are drawn from [3, vocab_size) excluding the special ids. Used by unit tests and by
    `data.kind: synthetic`.
    """
    block = image_placeholder_ids(ids, num_queries)
    specials = {ids.bos, ids.eos, ids.pad, ids.img_begin, ids.img_end, ids.img_slot}
    text_vocab = torch.tensor([t for t in range(vocab_size) if t not in specials])
    rows, seg_rows = [], []
    for _ in range(batch_size):
        n_text = seq_length - 2 - images_per_row * len(block) - 2  # leave two pad positions
        if n_text < images_per_row + 1:
            raise ValueError(f"seq_length {seq_length} too short for {images_per_row} images per row")
        text = text_vocab[torch.randint(len(text_vocab), (n_text,), generator=generator)].tolist()
        cuts = sorted(torch.randperm(n_text - 1, generator=generator)[:images_per_row].add(1).tolist())
        row, prev = [ids.bos], 0
        for cut in cuts:
            row += text[prev:cut] + block
            prev = cut
        row += text[prev:] + [ids.eos]
        pad = seq_length - len(row)
        rows.append(row + [ids.pad] * pad)
        seg_rows.append([0] * len(row) + [-1] * pad)
    input_ids = torch.tensor(rows, dtype=torch.long)
    segment_ids = torch.tensor(seg_rows, dtype=torch.long)
    position_ids = torch.arange(seq_length).expand(batch_size, -1).clone() * (segment_ids >= 0)
    n_images = batch_size * images_per_row
    images = torch.randn(n_images, 3, image_size, image_size, generator=generator)
    return Batch(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids, images=images)
