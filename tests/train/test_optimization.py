"""The optimisation pieces of a training step, in one process (gloo world of 1, megatron TP = PP = 1):
parameter groups, the learning-rate schedule, freezing switches, activation recomputation,
gradient accumulation."""
import math

import pytest
import torch

from emu_mc.batch import synthetic_batch
from emu_mc.config import OptimConfig
from emu_mc.parallel.setup import build_model_and_optimizer, component_of, decays, forward_backward, train_step, unwrap
from emu_mc.schedule import lr_at

GRAD_ATOL = 1e-6  # fp32, the same arithmetic in a different order (recompute, accumulation)


def build(cfg, special_ids, tokenizer, seed=0):
    torch.manual_seed(seed)
    cfg.data.kind = "synthetic"
    return build_model_and_optimizer(cfg, special_ids, len(tokenizer))


def batches(cfg, special_ids, tokenizer, n, rows=None, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [synthetic_batch(special_ids, batch_size=rows or cfg.data.micro_batch_size, seq_length=cfg.data.seq_length,
                            vocab_size=len(tokenizer), num_queries=cfg.model.resampler.num_queries,
                            image_size=cfg.model.vision.image_size, images_per_row=2, generator=g) for _ in range(n)]


def snapshot(chunk):
    return {name: p.detach().clone() for name, p in unwrap(chunk).named_parameters()}


def test_lr_schedule_warmup_then_cosine():
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_at(s, optim, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(54, optim, 104) == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(103, optim, 104) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(500, optim, 104) == pytest.approx(0.1)


def test_param_groups_scale_lr_and_never_decay_norms_or_biases(single_process_world, tiny_cfg, special_ids,
                                                                tokenizer):
    scales = {"vision": 0.1, "resampler": 0.5, "llm": 1.0, "heads": 2.0}
    for component, scale in scales.items():
        setattr(tiny_cfg.optim, f"lr_scale_{component}", scale)
    tiny_cfg.optim.weight_decay = 0.05
    chunks, optimizer = build(tiny_cfg, special_ids, tokenizer)
    train_step(chunks, optimizer, batches(tiny_cfg, special_ids, tokenizer, 1), lr=1e-3)
    names = {id(p): n for n, p in unwrap(chunks[0]).named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names.get(id(param))
            if name is None:  # the distributed optimizer's fp32 shard of a model parameter
                continue
            component = component_of(name)
            seen.add(component)
            assert group["lr"] == pytest.approx(1e-3 * scales[component]), name
            assert group["weight_decay"] == pytest.approx(0.05 if decays(param, name) else 0.0), name
    assert decays(torch.empty(4, 4), "llm.decoder.layers.0.mlp.linear_fc1.weight")
    assert not decays(torch.empty(4), "vision.blocks.0.norm1.weight")
    assert not decays(torch.empty(4), "vision.blocks.0.attn.qkv.bias")
    with pytest.raises(ValueError, match="no optimizer component"):
        component_of("mystery.weight")


@pytest.mark.parametrize("frozen", ["vision", "resampler", "llm"])
def test_freezing_a_component_keeps_it_fixed(single_process_world, tiny_cfg, special_ids, tokenizer, frozen):
    getattr(tiny_cfg.model, frozen).freeze = True
    chunks, optimizer = build(tiny_cfg, special_ids, tokenizer)
    before = snapshot(chunks[0])
    for batch in batches(tiny_cfg, special_ids, tokenizer, 2):
        out = train_step(chunks, optimizer, [batch], lr=1e-2)
        assert not out["skipped"] and math.isfinite(out["loss"])
    after = snapshot(chunks[0])
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if component_of(name) == frozen:
            assert not changed, f"{name} moved although model.{frozen}.freeze is on"
    assert any(not torch.equal(before[n], after[n]) for n in before if component_of(n) != frozen)


def grads(chunk):
    return {name: p.main_grad.detach().clone() for name, p in unwrap(chunk).named_parameters()}


@pytest.mark.parametrize("switch", ["recompute_activations", "recompute_vision"])
def test_activation_recomputation_gives_the_same_loss_and_grads(single_process_world, tiny_cfg, special_ids,
                                                                 tokenizer, switch):
    tiny_cfg.model.resampler.dropout = 0.1  # recomputation must replay the same dropout masks
    data = batches(tiny_cfg, special_ids, tokenizer, 1)
    plain, _ = build(tiny_cfg, special_ids, tokenizer)
    setattr(tiny_cfg.train, switch, True)
    recomputed, _ = build(tiny_cfg, special_ids, tokenizer)
    model = unwrap(recomputed[0])
    if switch == "recompute_activations":
        assert model.llm.config.recompute_granularity == "full"
    else:
        assert model.vision.recompute and model.recompute_vision
        block_calls = []
        for module in (model.vision.blocks[0], model.resampler):
            module.register_forward_pre_hook(lambda module, args: block_calls.append(module))
    torch.manual_seed(5)
    loss_plain = forward_backward(plain, data)
    torch.manual_seed(5)
    loss_recomputed = forward_backward(recomputed, data)
    if switch == "recompute_vision":  # run in forward, then again in backward
        assert len(block_calls) == 4, block_calls
    torch.testing.assert_close(loss_recomputed, loss_plain, rtol=1e-6, atol=0)
    expected = grads(plain[0])
    for name, grad in grads(recomputed[0]).items():
        torch.testing.assert_close(grad, expected[name], atol=GRAD_ATOL, rtol=1e-5, msg=name)


def test_gradient_accumulation_matches_one_big_batch(single_process_world, tiny_cfg, special_ids, tokenizer):
    """Two microbatches of 2 rows accumulate to the gradient of one 4-row batch (loss = mean over
    microbatches of each microbatch's mean)."""
    tiny_cfg.data.micro_batch_size = 2
    (big,) = batches(tiny_cfg, special_ids, tokenizer, 1, rows=4)
    halves = []
    for rows in (slice(0, 2), slice(2, 4)):
        images_per_row = 2
        halves.append(type(big)(input_ids=big.input_ids[rows], position_ids=big.position_ids[rows],
                                segment_ids=big.segment_ids[rows],
                                images=big.images[rows.start * images_per_row:rows.stop * images_per_row]))
    accumulated, _ = build(tiny_cfg, special_ids, tokenizer)
    whole, _ = build(tiny_cfg, special_ids, tokenizer)
    loss_acc = forward_backward(accumulated, halves)
    forward_backward(whole, [big])
    assert math.isfinite(loss_acc[0].item())
    expected = grads(whole[0])
    for name, grad in grads(accumulated[0]).items():
        # equal when every microbatch holds as many text and visual targets as the other
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-3, msg=name)
