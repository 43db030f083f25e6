"""A real learning check: the tiny Emu drives the total loss on one fixed batch down by >= 90%."""
import torch

from emu_mc.batch import synthetic_batch
from emu_mc.model.emu import EmuModel


def test_tiny_model_overfits_one_batch(single_process_world, tiny_cfg, special_ids, tokenizer):
    torch.manual_seed(0)
    tiny_cfg.model.loss.impl = tiny_cfg.model.resampler.attention_impl = "reference"
    model = EmuModel(tiny_cfg.model, special_ids, len(tokenizer))
    batch = synthetic_batch(special_ids, batch_size=2, seq_length=64, vocab_size=len(tokenizer),
                            num_queries=tiny_cfg.model.resampler.num_queries, image_size=32,
                            generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    history = []
    for _ in range(300):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in out.items()})
    first, last = history[0], history[-1]
    assert last["loss"] <= 0.1 * first["loss"], (first, last)
    assert last["ce"] < first["ce"] and last["reg"] < first["reg"], (first, last)
