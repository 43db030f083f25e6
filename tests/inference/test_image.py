"""Image generation: the cached regression loop against a teacher-forced forward, guidance, the
diffusers decoder (tiny random directory): size, seeds, schedulers."""
import numpy as np
import pytest
import torch

from emu_mc.inference import ImageSettings, Request, VisualDecoder, generate_images, regress_embeddings
from emu_mc.inference.image import image_conditions
from emu_mc.inference.kv_cache import recomputed_hidden_states
from emu_mc.inference.prompts import PromptBuilder
from emu_mc.inference.session import token_inputs


@pytest.mark.parametrize("use_cache", [True, False])
def test_regression_loop_equals_teacher_forced_forward(tiny_emu, image_files, use_cache):
    """The Q embeddings regressed one at a time == the regression head over one forward of the final
    sequence (prompt, [IMG], the fed-back embeddings in the <image> slots), left-padded rows, fp32."""
    emu, model = tiny_emu, tiny_emu.model
    paths, _ = image_files
    requests = [Request("{image} the same cat, drawn", images=[paths[0]]),
                Request("a red brick building with many windows"),
                Request("")]
    batch = PromptBuilder(emu.cfg, emu.tokenizer, emu.ids, emu.cfg.model.vision.image_size).batch(requests, 200)
    regressed = regress_embeddings(model, batch, use_cache=use_cache)  # [B, Q, H]
    q = emu.cfg.model.resampler.num_queries
    assert regressed.shape == (3, q, emu.cfg.model.llm.hidden_size)
    with torch.no_grad():
        begin = torch.full((3, 1), emu.ids.img_begin)
        inputs = torch.cat([model.embed(batch), token_inputs(model, begin), regressed[:, :-1].transpose(0, 1)])
        valid = torch.cat([batch.segment_ids >= 0, torch.ones(3, q, dtype=torch.bool)], 1)
        hidden = recomputed_hidden_states(model.llm, inputs, valid)
        expected = model.regress_head(hidden[-q:]).transpose(0, 1)
    diff = (regressed - expected).abs().max()
    assert diff <= 1e-5, f"regression loop vs teacher-forced forward: max abs diff {diff}"


def test_guidance_branch_is_the_empty_prompt(tiny_emu):
    cond, uncond = image_conditions(tiny_emu, [Request("a cat"), Request("a long prompt about a dog")],
                                    ImageSettings(guidance_scale=7.5))
    alone = image_conditions(tiny_emu, [Request("")], ImageSettings(guidance_scale=1.0))[0]
    assert uncond.shape == cond.shape
    torch.testing.assert_close(uncond, alone.expand_as(uncond), atol=1e-5, rtol=0)
    assert image_conditions(tiny_emu, [Request("a cat")], ImageSettings(guidance_scale=1.0))[1] is None


@pytest.fixture(scope="module")
def decoder(tiny_decoder_dir):
    return VisualDecoder.load(tiny_decoder_dir[0], llm_width=64)


def test_guidance_scale_one_equals_no_guidance(decoder):
    torch.manual_seed(0)
    cond, uncond = torch.randn(2, 8, 64), torch.randn(2, 8, 64)
    latents = decoder.prepare_latents(2, 8, 8, seed=5, steps=2)
    with torch.no_grad():
        guided = decoder.denoise(latents, cond, uncond, guidance_scale=1.0, steps=2)
        plain = decoder.denoise(latents, cond, None, guidance_scale=1.0, steps=2)
        strong = decoder.denoise(latents, cond, uncond, guidance_scale=7.5, steps=2)
    torch.testing.assert_close(guided, plain, atol=1e-5, rtol=1e-5)
    assert (strong - plain).abs().max() > 1e-3


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler"])
def test_image_size_and_seed(tiny_emu, decoder, scheduler):
    requests = [Request("a cat"), Request("a dog")]
    settings = ImageSettings(steps=2, scheduler=scheduler, height=8, width=12, seed=7, guidance_scale=3.0)
    images, nsfw = generate_images(tiny_emu, decoder, requests, settings)
    again, _ = generate_images(tiny_emu, decoder, requests, settings)
    assert nsfw is None  # the tiny decoder has no safety checker
    assert [im.shape for im in images] == [(8, 12, 3)] * 2 and images[0].dtype == np.uint8
    assert all(np.array_equal(a, b) for a, b in zip(images, again))
    if scheduler == "pndm":
        other, _ = generate_images(tiny_emu, decoder, requests, ImageSettings(**{**settings.__dict__, "seed": 8}))
        assert not np.array_equal(images[0], other[0])


def test_native_size_by_default(tiny_emu, decoder):
    images, _ = generate_images(tiny_emu, decoder, [Request("a cat")], ImageSettings(steps=1, guidance_scale=1.0))
    assert images[0].shape == (decoder.native_size, decoder.native_size, 3) == (16, 16, 3)


def test_safety_checker_runs_when_present(tiny_emu, tmp_path):
    from emu_mc.inference.tiny_decoder import write_tiny_decoder

    directory = write_tiny_decoder(str(tmp_path / "checked"), cross_attention_dim=64, sample_size=8,
                                   safety_checker=True)
    checked = VisualDecoder.load(directory, llm_width=64)
    images, nsfw = generate_images(tiny_emu, checked, [Request("a cat")], ImageSettings(steps=1, guidance_scale=1.0))
    assert nsfw == [False] and images[0].shape == (16, 16, 3)
