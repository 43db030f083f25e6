"""docs/model.md "The objective": text targets skip image tokens; regression pairs per image; clear assembly errors."""
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from emu_mc.batch import Batch, synthetic_batch
from emu_mc.model.emu import EmuModel
from emu_mc.model.targets import IGNORE_INDEX, check_image_blocks, regression_mask, text_targets, with_loss_rows
from emu_mc.tokenizer import image_placeholder_ids

Q = 8  # num_queries of the tiny config


def _row(ids, pieces, length):
    """Concatenate token pieces ("img" = one image block) and pad to `length`."""
    row = []
    for piece in pieces:
        row += image_placeholder_ids(ids, Q) if piece == "img" else list(piece)
    return row + [ids.pad] * (length - len(row)), len(row)


def test_text_targets_ignore_image_tokens_pad_and_document_edges(special_ids):
    ids = special_ids
    row, n = _row(ids, [[ids.bos, 10, 11], "img", [12, ids.eos], [ids.bos, 13, ids.eos]], 24)
    input_ids = torch.tensor([row])
    seg = torch.tensor([[0] * 15 + [1] * 3 + [-1] * (24 - n)])
    got = text_targets(input_ids, seg, ids)[0].tolist()
    # [IMG] and its slots are never text targets; [/IMG] predicts 12; doc 0's eos must not predict
    # doc 1's bos; the last real token must not predict padding.
    want = [10, 11] + [IGNORE_INDEX] * (Q + 2) + [12, ids.eos, IGNORE_INDEX, 13, ids.eos]
    want += [IGNORE_INDEX] * (24 - len(want))
    assert got == want


def _model(tiny_cfg, special_ids, tokenizer):
    tiny_cfg.model.loss.impl = "reference"
    tiny_cfg.model.resampler.attention_impl = "reference"
    return EmuModel(tiny_cfg.model, special_ids, len(tokenizer))


@pytest.mark.parametrize("images_per_row", [1, 3])
def test_regression_pairs_are_img_to_slot1_slotk_to_next_last_to_end(
        single_process_world, tiny_cfg, special_ids, tokenizer, images_per_row):
    torch.manual_seed(0)
    model = _model(tiny_cfg, special_ids, tokenizer)
    batch = synthetic_batch(special_ids, batch_size=2, seq_length=96, vocab_size=len(tokenizer), num_queries=Q,
                            image_size=32, images_per_row=images_per_row)
    decoder_input = model.embed(batch)  # [S, B, H]
    reg_index, reg_targets = model.regression_targets(decoder_input, batch)
    assert reg_index.numel() == 2 * images_per_row * (Q + 1)
    visual = model.encode_images(batch.images)  # [N, Q, H]
    end_embedding = model.llm.embedding.word_embeddings.weight[special_ids.img_end]
    b_size = batch.input_ids.shape[0]
    expected = {}
    image = 0
    for b in range(b_size):
        for p in (batch.input_ids[b] == special_ids.img_begin).nonzero().flatten().tolist():
            for k in range(Q + 1):  # [IMG] (k=0) and slots 1..Q predict slot k+1, the last one [/IMG]
                flat = (p + k) * b_size + b
                expected[flat] = visual[image, k] if k < Q else end_embedding
            image += 1
    assert sorted(expected) == reg_index.tolist()
    for row, flat in enumerate(reg_index.tolist()):
        torch.testing.assert_close(reg_targets[row], expected[flat].detach(), rtol=0, atol=1e-6)
    assert not reg_targets.requires_grad


def test_no_images_gives_zero_regression_and_no_nan(single_process_world, tiny_cfg, special_ids, tokenizer):
    model = _model(tiny_cfg, special_ids, tokenizer)
    batch = synthetic_batch(special_ids, batch_size=2, seq_length=32, vocab_size=len(tokenizer), num_queries=Q,
                            image_size=32, images_per_row=0)
    out = model(batch)
    assert out["reg"].item() == 0.0 and torch.isfinite(out["loss"]) and out["ce"].item() > 0
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mismatched_placeholders_raise(single_process_world, tiny_cfg, special_ids, tokenizer):
    model = _model(tiny_cfg, special_ids, tokenizer)
    batch = synthetic_batch(special_ids, batch_size=1, seq_length=40, vocab_size=len(tokenizer), num_queries=Q,
                            image_size=32, images_per_row=1)
    two_images = Batch(batch.input_ids, batch.position_ids, batch.segment_ids, batch.images.repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="2 images need 2 \\[IMG\\], 16 <image>"):
        model(two_images)
    short = batch.input_ids.clone()
    slot = (short[0] == special_ids.img_slot).nonzero()[0, 0]
    short[0, slot] = 50  # one <image> too few
    with pytest.raises(ValueError, match="the batch has 1, 7 and 1"):
        check_image_blocks(short, 1, Q, special_ids)


def test_regression_mask_counts_q_plus_one_per_image(special_ids):
    row, _ = _row(special_ids, [[special_ids.bos], "img", [5], "img", [special_ids.eos]], 30)
    assert int(regression_mask(torch.tensor([row]), special_ids).sum()) == 2 * (Q + 1)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("masked", [False, True], ids=["pretraining", "loss_mask"])
def test_loss_rows_found_on_the_host_change_nothing_and_the_loss_needs_no_nonzero(
        single_process_world, tiny_cfg, special_ids, tokenizer, masked):
    """with_loss_rows (what the training loop applies before the batch moves to the GPU): the same loss
    and gradients as rows the model finds itself, and the loss then runs no data-dependent-shape op."""
    torch.manual_seed(0)
    model = _model(tiny_cfg, special_ids, tokenizer)
    batch = synthetic_batch(special_ids, batch_size=2, seq_length=96, vocab_size=len(tokenizer), num_queries=Q,
                            image_size=32, images_per_row=2)
    if masked:  # the second half of each row is not a target
        batch = dataclasses.replace(batch, loss_mask=torch.arange(96).expand(2, -1) < 48)
    prepared = with_loss_rows(batch, special_ids)
    assert prepared.text_rows.numel() > 0 and prepared.regression_rows.numel() == (2 if masked else 4) * (Q + 1)
    results = []
    for b in (batch, prepared):
        model.zero_grad()
        out = model(b)
        out["loss"].backward()
        results.append((out, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (want, want_grads), (got, got_grads) = results
    for key in ("loss", "ce", "reg"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    decoder_input = model.embed(prepared)
    hidden = torch.randn(96, 2, model.cfg.llm.hidden_size)
    with _RecordOps() as recorded:
        reg_index, reg_targets = model.regression_targets(decoder_input, prepared)
        model.loss(hidden, prepared, reg_index, reg_targets)
    assert "aten.nonzero" not in recorded.ops
