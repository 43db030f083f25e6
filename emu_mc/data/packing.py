"""Greedy in-order packing of documents into rows of a Batch (emu_mc/batch.py).

Documents go into the current row while they fit; one that does not fit starts the next row; one
that does not fit the last row is carried over to start the next batch. Documents are never split
(the builder already truncated each to seq_length), so an image block is never cut. Each document
gets position ids 0..len-1 and its index in the row as segment id; padding gets pad id, position 0
and segment -1. When a document carries a loss mask (chat), the batch gets `loss_mask`: that mask on
its tokens, True on every token of the other documents, False on padding.
"""
from typing import Any, Callable, List, Optional, Tuple

import torch

from emu_mc.batch import Batch
from emu_mc.data.document import Document


def assemble_batch(rows: List[List[Document]], seq_length: int, pad_id: int, image_size: int) -> Batch:
    """rows of documents -> Batch with input/position/segment ids [len(rows), seq_length] and
    images [N, 3, image_size, image_size] float32 in order of appearance."""
    b = len(rows)
    input_ids = torch.full((b, seq_length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, seq_length), dtype=torch.long)
    segment_ids = torch.full((b, seq_length), -1, dtype=torch.long)
    images = []
    masked = any(doc.loss_mask is not None for docs in rows for doc in docs)
    loss_mask = torch.zeros((b, seq_length), dtype=torch.bool) if masked else None
    for r, docs in enumerate(rows):
        at = 0
        for d, doc in enumerate(docs):
            n = len(doc.tokens)
            if at + n > seq_length:
                raise ValueError(f"row {r}: documents of {at + n} tokens exceed seq_length {seq_length}")
            input_ids[r, at:at + n] = torch.tensor(doc.tokens, dtype=torch.long)
            position_ids[r, at:at + n] = torch.arange(n)
            segment_ids[r, at:at + n] = d
            if masked:
                loss_mask[r, at:at + n] = True if doc.loss_mask is None else torch.tensor(doc.loss_mask)
            at += n
            if doc.images.shape[0]:
                images.append(doc.images)
    stacked = torch.cat(images) if images else torch.zeros(0, 3, image_size, image_size)
    return Batch(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids, images=stacked,
                 loss_mask=loss_mask)


class Packer:
    """Fills micro_batch_size rows from `draw() -> (Document, snapshot)`; keeps the carried-over
    document together with the snapshot taken before it was drawn (what a checkpoint must store)."""

    def __init__(self, seq_length: int, batch_size: int, pad_id: int, image_size: int):
        self.seq_length = seq_length
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.image_size = image_size
        self.carry: Optional[Tuple[Document, Any]] = None

    def next_batch(self, draw: Callable[[], Tuple[Document, Any]]) -> Batch:
        rows: List[List[Document]] = [[]]
        used = 0
        while True:
            doc, snap = self.carry if self.carry is not None else draw()
            self.carry = None
            n = len(doc.tokens)
            if n > self.seq_length:
                raise ValueError(f"a document of {n} tokens exceeds seq_length {self.seq_length}")
            if used + n > self.seq_length:
                if len(rows) == self.batch_size:
                    self.carry = (doc, snap)
                    break
                rows.append([])
                used = 0
            rows[-1].append(doc)
            used += n
            if used == self.seq_length and len(rows) == self.batch_size:
                break
        return assemble_batch(rows, self.seq_length, self.pad_id, self.image_size)
