"""Text generation: the KV cache against the training forward, beam search against greedy and against
teacher-forced log-probabilities, sampling settings, left padding (random tiny Emu, fp32 on CPU)."""
import pytest
import torch

from emu_mc.inference import Request, TextSettings, generate_text
from emu_mc.inference.kv_cache import cached_hidden_states, new_cache, recomputed_hidden_states
from emu_mc.inference.prompts import PromptBuilder
from emu_mc.inference.session import lm_logits
from emu_mc.inference.text import BeamSearch, TokenPicker, decode, process_logits, sampling_warp


def requests_with_images(image_files):
    """Three prompts of different lengths (so rows are left-padded), two with images."""
    paths, _ = image_files
    return [Request("{image} a photo of", images=[paths[0]]),
            Request("The dog runs along the beach while waves break, and then", images=[]),
            Request("{image} and {image}: the first one shows", images=[paths[1], paths[2]])]


def test_cache_matches_training_forward_in_chunks(tiny_emu):
    """Prefill + single steps through the cache == one training forward, on left-padded rows, with GQA."""
    llm = tiny_emu.model.llm
    torch.manual_seed(1)
    x = torch.randn(11, 3, llm.config.hidden_size)
    valid = torch.ones(3, 11, dtype=torch.bool)
    valid[1, :4] = valid[2, :7] = False
    with torch.no_grad():
        expected = recomputed_hidden_states(llm, x, valid)
        cache = new_cache(llm, 3, 11)
        got = torch.cat([cached_hidden_states(llm, x[:7], valid[:, :7], cache)] +
                        [cached_hidden_states(llm, x[i:i + 1], valid[:, i:i + 1], cache) for i in range(7, 11)])
    assert llm.config.num_query_groups < llm.config.num_attention_heads  # the tiny config exercises GQA
    diff = (got - expected).transpose(0, 1)[valid].abs().max()
    assert diff <= 1e-5, f"cached vs training forward: max abs diff {diff}"


def test_recompute_pads_lengths_to_a_step(tiny_emu, monkeypatch):
    """Without a cache, a padded batch runs the training forward at a multiple of LENGTH_STEP positions
    (compiled FlexAttention then builds a kernel per 128 positions, not per token), with the real
    positions' states those of the forward at the batch's own length; an unpadded batch keeps its length."""
    import emu_mc.model.llm as llm_module
    from emu_mc.inference.kv_cache import LENGTH_STEP

    llm = tiny_emu.model.llm
    torch.manual_seed(2)
    x = torch.randn(11, 3, llm.config.hidden_size)
    valid = torch.ones(3, 11, dtype=torch.bool)
    valid[1, :4] = False
    lengths, forward = [], llm_module.llm_hidden_states
    monkeypatch.setattr(llm_module, "llm_hidden_states", lambda llm, x, *rest: lengths.append(x.shape[0]) or
                        forward(llm, x, *rest))
    with torch.no_grad():
        padded = recomputed_hidden_states(llm, x, valid)
        unpadded = recomputed_hidden_states(llm, x[:, :1], valid[:1])
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        expected = forward(llm, x, positions, torch.where(valid, 0, -1))
    assert lengths == [LENGTH_STEP, 11] and padded.shape == expected.shape
    torch.testing.assert_close(padded.transpose(0, 1)[valid], expected.transpose(0, 1)[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unpadded, expected[:, :1], atol=1e-5, rtol=1e-5)


def test_cached_greedy_equals_uncached(tiny_emu, image_files):
    requests = requests_with_images(image_files)
    cached = generate_text(tiny_emu, requests, TextSettings(max_new_tokens=12))
    uncached = generate_text(tiny_emu, requests, TextSettings(max_new_tokens=12, use_cache=False))
    assert [r.tokens for r in cached] == [r.tokens for r in uncached]
    assert all(len(r.tokens) == 12 or r.finish_reason == "eos" for r in cached)


def test_left_padding_does_not_change_a_row(tiny_emu, image_files):
    """A request generates the same tokens alone and in a left-padded batch."""
    requests = requests_with_images(image_files)
    batched = generate_text(tiny_emu, requests, TextSettings(max_new_tokens=8))
    for request, out in zip(requests, batched):
        assert generate_text(tiny_emu, [request], TextSettings(max_new_tokens=8))[0].tokens == out.tokens


def test_one_beam_equals_greedy(tiny_emu, image_files):
    requests = requests_with_images(image_files)
    settings = TextSettings(max_new_tokens=10, num_beams=1).validate()
    greedy = decode(tiny_emu, requests, settings, TokenPicker)
    beam = decode(tiny_emu, requests, settings, BeamSearch)
    assert [r.tokens for r in beam] == [r.tokens for r in greedy]


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_score_is_summed_logprobs(tiny_emu, image_files, use_cache):
    """length_penalty 0: each returned beam's score == the sum of its tokens' log-probabilities in a
    teacher-forced forward of prompt + beam."""
    emu = tiny_emu
    requests = requests_with_images(image_files)
    settings = TextSettings(max_new_tokens=6, num_beams=4, length_penalty=0.0, use_cache=use_cache)
    results = generate_text(emu, requests, settings)
    builder = PromptBuilder(emu.cfg, emu.tokenizer, emu.ids, emu.cfg.model.vision.image_size)
    for request, result in zip(requests, results):
        batch = builder.batch([request], 200)
        full = torch.cat([batch.input_ids, torch.tensor([result.tokens])], 1)
        batch.input_ids, n = full, batch.input_ids.shape[1]
        batch.segment_ids = torch.zeros_like(full)
        batch.position_ids = torch.arange(full.shape[1])[None]
        seen = torch.zeros(1, emu.model.vocab_size, dtype=torch.bool)
        with torch.no_grad():
            hidden = recomputed_hidden_states(emu.model.llm, emu.model.embed(batch), batch.segment_ids >= 0)
            total = 0.0
            for i, token in enumerate(result.tokens):
                logits = process_logits(lm_logits(emu.model, hidden[n - 1 + i]), seen, i, settings, emu.ids)
                total += float(logits.log_softmax(-1)[0, token])
        assert result.score == pytest.approx(total, abs=1e-4)


def test_beams_beat_greedy_in_log_probability(tiny_emu, image_files):
    requests = requests_with_images(image_files)
    greedy = generate_text(tiny_emu, requests, TextSettings(max_new_tokens=6, num_beams=1))
    beams = generate_text(tiny_emu, requests, TextSettings(max_new_tokens=6, num_beams=5, length_penalty=0.0))
    greedy_as_beam = decode(tiny_emu, requests, TextSettings(max_new_tokens=6, length_penalty=0.0), BeamSearch)
    for g, gb, b in zip(greedy, greedy_as_beam, beams):
        assert g.tokens == gb.tokens
        assert b.score >= gb.score - 1e-6


def test_sampling_is_seeded_and_respects_top_k(tiny_emu):
    requests = [Request("A photo of"), Request("hi")]
    one = generate_text(tiny_emu, requests, TextSettings(max_new_tokens=8, do_sample=True, top_k=5, seed=3))
    two = generate_text(tiny_emu, requests, TextSettings(max_new_tokens=8, do_sample=True, top_k=5, seed=3))
    other = generate_text(tiny_emu, requests, TextSettings(max_new_tokens=8, do_sample=True, top_k=5, seed=4))
    assert [r.tokens for r in one] == [r.tokens for r in two]
    assert [r.tokens for r in one] != [r.tokens for r in other]
    top1 = generate_text(tiny_emu, requests, TextSettings(max_new_tokens=8, do_sample=True, top_k=1, seed=9))
    greedy = generate_text(tiny_emu, requests, TextSettings(max_new_tokens=8))
    assert [r.tokens for r in top1] == [r.tokens for r in greedy]


def test_sampling_warp_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = sampling_warp(logits, TextSettings(top_p=0.8)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = sampling_warp(logits, TextSettings(top_p=0.01)).isfinite()
    assert kept.tolist() == [[True, False, False, False]]


def test_min_new_tokens_and_eos(tiny_emu, monkeypatch):
    """min_new_tokens holds eos back; a model pushed towards eos stops and pads the row."""
    import emu_mc.inference.text as text

    eos = tiny_emu.ids.eos

    def eos_favoured(model, hidden):
        logits = lm_logits(model, hidden)
        logits[:, eos] += 100.0
        return logits

    monkeypatch.setattr(text, "lm_logits", eos_favoured)
    prompt = [Request("A photo of"), Request("hi")]
    stopped = generate_text(tiny_emu, prompt, TextSettings(max_new_tokens=10))
    held = generate_text(tiny_emu, prompt, TextSettings(max_new_tokens=10, min_new_tokens=4))
    beam = generate_text(tiny_emu, prompt, TextSettings(max_new_tokens=10, num_beams=3))
    assert all(r.tokens == [eos] and r.finish_reason == "eos" for r in stopped + beam)
    assert all(len(r.tokens) == 5 and r.tokens[-1] == eos and eos not in r.tokens[:-1] for r in held)


def test_processors_penalise_repeats_and_suppress_special_tokens():
    from emu_mc.tokenizer import SpecialTokenIds

    ids = SpecialTokenIds(bos=4, eos=5, pad=6, img_begin=7, img_end=8, img_slot=9)
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    seen = torch.tensor([[True, True, False, False, False, False, False, False, False, False]])
    out = process_logits(logits, seen, 0, TextSettings(repetition_penalty=2.0), ids)[0]
    assert out[:4].tolist() == [1.0, -2.0, 3.0, 0.5]
    assert out[[4, 6, 7, 8, 9]].isneginf().all() and out[5] == 1.0  # eos allowed once min_new_tokens is met
    assert process_logits(logits, seen, 0, TextSettings(min_new_tokens=1), ids)[0, 5].isneginf()


def test_prompt_layout_follows_the_training_path(tiny_emu, image_files, tmp_path):
    """Markers place files; files without a marker go first; a video is frames_per_video image blocks;
    the prompt is left open (no eos) and left-padded."""
    import numpy as np

    from tests.data.helpers import encode_video

    emu, ids = tiny_emu, tiny_emu.ids
    paths, _ = image_files
    video = tmp_path / "clip.webm"
    video.write_bytes(encode_video(np.random.default_rng(0).integers(0, 256, (6, 32, 48, 3), dtype=np.uint8)))
    builder = PromptBuilder(emu.cfg, emu.tokenizer, ids, emu.cfg.model.vision.image_size)
    batch = builder.batch([Request("what happens in {video}?", images=[paths[0]], videos=[str(video)]),
                           Request("hi")], 200)
    frames = emu.cfg.data.frames_per_video
    assert batch.images.shape[0] == 1 + frames
    row = batch.input_ids[0].tolist()
    assert row[0] == ids.bos and row[1] == ids.img_begin and ids.eos not in row
    assert row.count(ids.img_begin) == 1 + frames
    text_before_video = row.index(ids.img_begin, 2) - (emu.cfg.model.resampler.num_queries + 3)
    assert text_before_video > 0  # "what happens in" sits between the leading image and the video
    short = batch.input_ids[1].tolist()
    pads = short.index(ids.bos)
    assert pads > 0 and short[:pads] == [ids.pad] * pads and ids.pad not in short[pads:]
    assert (batch.segment_ids[1] == -1).sum() == pads and batch.position_ids[1, pads:].tolist() == list(
        range(len(short) - pads))
    out = generate_text(emu, [Request("{video} shows", videos=[str(video)])], TextSettings(max_new_tokens=3))
    assert len(out[0].tokens) == 3
