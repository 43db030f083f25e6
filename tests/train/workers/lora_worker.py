"""LoRA fine-tuning of the tiny Emu in several TP x PP layouts, one after another in one launch (run
under torchrun by tests/train/test_finetune.py; process start-up dominates, so one launch runs all).

--init DIR --save-init        a TP = 1 LoRA model with random, non-zero adapters (so every adapter gets a
                              gradient), saved whole (base + adapters) as a dist checkpoint
--init DIR --out ROOT --runs JSON
                              for each run {"name", "tp", "pp", "set": [config overrides], "finetune": {...},
                              "build_only": bool}: build that layout (emu_mc.parallel.setup), load the weights,
                              reseed, forward+backward over the fixed global batch (every DP rank takes all of
                              it, so DP = 2 computes the one-process result, dropout masks included), save the
                              DP-reduced adapter gradients as a dist checkpoint under ROOT/name/grads, then 3
                              optimizer steps; ROOT/name/result.json: the loss, the trainable parameters, those
                              the optimizer holds, whether the base stayed bit-identical, the adapters moved
                              and the TP replicas of replicated adapters agree; at PP = 1 the eval loss of a
                              microbatch before and after merging this layout's adapter shards.
"""
import json
import os

import torch
import torch.distributed as dist

from emu_mc.config import FinetuneConfig, load_config
from emu_mc.model.lora import is_adapter, merge_adapters
from emu_mc.parallel.groups import init_distributed
from emu_mc.parallel.setup import build_model_and_optimizer, forward_backward, train_step, unwrap
from emu_mc.tokenizer import load_tokenizer, special_token_ids
from tests.parallel.workers.layout_worker import (complete_reduce_scattered_grads, global_batch, parse_args,
                                                  replicas_identical, save_model)


def build(tp, pp, overrides, finetune):
    cfg = load_config("configs/tiny.yaml", [*overrides, "--parallel.tensor_parallel", str(tp),
                                            "--parallel.pipeline_parallel", str(pp)])
    cfg.finetune = FinetuneConfig(**finetune)  # init_from aside: the weights come from --init
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    ids = special_token_ids(tokenizer)
    chunks, optimizer = build_model_and_optimizer(cfg, ids, len(tokenizer))
    return cfg, ids, len(tokenizer), chunks, optimizer


def optimizer_parameter_names(model, optimizer):
    """Names of the model parameters megatron's optimizer updates."""
    names = {id(p): n for n, p in model.named_parameters()}
    held = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = getattr(opt, "model_param_gbuf_map", None) or [p for g in opt.param_groups for p in g["params"]]
        held += [names[id(p)] for p in params]
    return sorted(held)


def save_init(args):
    init_distributed(1, 1, seed=1234)
    _, _, _, chunks, _ = build(1, 1, [], {"mode": "lora"})
    model = unwrap(chunks[0])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_model(model, args.init)


def run_layout(args, run):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    init_distributed(run["tp"], run["pp"], seed=1234)
    cfg, ids, vocab_size, chunks, optimizer = build(run["tp"], run["pp"], run.get("set", []), run["finetune"])
    model = unwrap(chunks[0])
    out = os.path.join(args.out, run["name"])
    result = {"trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
              "all": sorted(n for n, _ in model.named_parameters()),
              "optimizer": optimizer_parameter_names(model, optimizer)}
    if not run.get("build_only"):
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.init))
        optimizer.reload_model_params()
        microbatches = global_batch(cfg, ids, vocab_size)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.manual_seed(99)  # the adapters' dropout masks: the same draws in every layout
        result["loss"] = forward_backward(chunks, microbatches).tolist()[0]
        complete_reduce_scattered_grads(chunks[0])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(p.main_grad)
        save_model(model, os.path.join(out, "grads"))  # the frozen base as it is, the adapters' gradients
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(before[name])
        optimizer.reload_model_params()
        for step in range(3):
            torch.manual_seed(100 + step)
            train_step(chunks, optimizer, microbatches, lr=1e-2)
        params = dict(model.named_parameters())
        result["base_identical"] = all(torch.equal(params[n], before[n]) for n in params if not is_adapter(n))
        result["adapters_moved"] = all(not torch.equal(params[n], before[n]) for n in params if is_adapter(n))
        replicated = [p for n, p in params.items() if is_adapter(n) and not getattr(p, "tensor_model_parallel", False)]
        result["tp_replicas_identical"] = replicas_identical(replicated, ps.get_tensor_model_parallel_group())
        if run["pp"] == 1:  # this layout's shards merged in place: the same loss (eval: no dropout)
            model.eval()
            with torch.no_grad():
                adapted = model(microbatches[0])["loss"].item()
                merge_adapters(model)
                result["merged_loss"] = [adapted, model(microbatches[0])["loss"].item()]
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(results, f)
    ps.destroy_model_parallel()


def main():
    from megatron.core import parallel_state as ps

    args = parse_args()
    if args.save_init:
        save_init(args)
        ps.destroy_model_parallel()
    for run in args.runs:
        run_layout(args, run)


if __name__ == "__main__":
    main()
