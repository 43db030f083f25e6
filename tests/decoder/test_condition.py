"""The decoder's condition: teacher forcing equals generation's regression loop fed the image's own
embeddings; dropped conditions are generation's unconditional one; pairs from the bundled shards."""
import os

import torch

from emu_mc.decoder.condition import drop_conditions, teacher_forced_conditions, unconditional_condition
from emu_mc.inference import ImageSettings, Request
from emu_mc.inference.image import image_conditions
from emu_mc.inference.prompts import PromptBuilder
from emu_mc.inference.session import LLMSession


def test_teacher_forced_condition_equals_the_regression_loop(tiny_emu, image_files):
    """One forward over `caption [IMG] <image>xQ [/IMG]` == the image path's loop (LLMSession, KV cache)
    when each slot is fed the image's own visual embedding instead of the regressed one; left-padded
    rows of different lengths, fp32."""
    emu, model = tiny_emu, tiny_emu.model
    paths, _ = image_files
    builder = PromptBuilder(emu.cfg, emu.tokenizer, emu.ids, emu.cfg.model.vision.image_size)
    batch = builder.batch([Request("a cat {image}", images=[paths[0]]),
                           Request("a red brick building with many windows {image}", images=[paths[1]])], 200)
    cond = teacher_forced_conditions(model, batch)
    q, rows = emu.cfg.model.resampler.num_queries, 2
    with torch.no_grad():
        inputs = model.embed(batch)  # [S, B, H], the slots hold the visual embeddings
        begin = batch.input_ids.shape[1] - q - 2
        session = LLMSession(model.llm, rows, inputs.shape[0])
        hidden = session.feed(inputs[:begin + 1], batch.segment_ids[:, :begin + 1] >= 0)[-1]
        loop = []
        for i in range(q):
            loop.append(model.regress_head(hidden))
            if i + 1 < q:
                hidden = session.feed(inputs[begin + 1 + i][None], torch.ones(rows, 1, dtype=torch.bool))[-1]
    expected = torch.stack(loop, 1)
    assert cond.shape == (rows, q, emu.cfg.model.llm.hidden_size)
    diff = (cond - expected).abs().max()
    assert diff <= 1e-5, f"teacher-forced forward vs regression loop: max abs diff {diff}"


def test_dropped_condition_is_generations_unconditional_one(tiny_emu):
    uncond = unconditional_condition(tiny_emu)
    _, guidance = image_conditions(tiny_emu, [Request("a cat")], ImageSettings(guidance_scale=7.5))
    torch.testing.assert_close(uncond, guidance, atol=1e-5, rtol=0)
    cond = torch.randn(4000, *uncond.shape[1:])
    out, dropped = drop_conditions(cond, uncond, 0.1, torch.Generator().manual_seed(0))
    assert abs(dropped.float().mean().item() - 0.1) < 0.015  # 4000 draws: std of the rate 0.0047
    assert torch.equal(out[dropped], uncond.expand(int(dropped.sum()), -1, -1))
    assert torch.equal(out[~dropped], cond[~dropped])


def test_pairs_from_the_bundled_shards(tiny_emu):
    from emu_mc.decoder.config import decoder_config_from_dict
    from emu_mc.decoder.data import pair_loader

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shards = os.path.join(root, "data/sample/image_text/laion-{000000..000001}.tar")
    cfg = decoder_config_from_dict({"emu": {"checkpoint": "x"}, "decoder": {"init": "x", "resolution": 24},
                                    "data": {"sources": [{"shards": shards}], "micro_batch_size": 3}})
    loader = pair_loader(cfg, tiny_emu, seed=0, dp_rank=0, dp_size=1)
    pairs = next(loader)
    q = tiny_emu.cfg.model.resampler.num_queries
    assert pairs.pixels.shape == (3, 3, 24, 24) and -1 <= pairs.pixels.min() < pairs.pixels.max() <= 1
    assert (pairs.emu.input_ids[:, -q - 2] == tiny_emu.ids.img_begin).all()
    assert (pairs.emu.input_ids[:, -1] == tiny_emu.ids.img_end).all() and pairs.emu.images.shape[0] == 3
    state = loader.state_dict()
    after = next(loader)
    loader.load_state_dict(state)
    assert torch.equal(next(loader).pixels, after.pixels)
