"""One training step of the tiny Emu model in several TP x PP x DP layouts, one after another in one
launch (run under torchrun; process start-up dominates these tests, so a launch runs every layout of
its world size).

--init DIR --save-init [--set JSON]  build the model (seeded) and save its weights as a dist checkpoint
--init DIR --out ROOT --runs JSON     for each run {"name", "tp", "pp", "set": [config overrides]}: set up
                                      that layout, load the weights, run forward+backward on this rank's
                                      share of a fixed global batch, save the DP-reduced gradients (as a
                                      dist checkpoint of the model: the gradients written into the
                                      parameters) under ROOT/name/grads, then one optimizer step; write
                                      ROOT/name/result.json: the loss terms, whether DP and TP replicas hold
                                      identical parameters, and per rank its coordinates, the images its
                                      vision encoder ran on and its number of LLM layers.
--set JSON                            config overrides (a list of argv words) applied to every run, before
                                      each run's own.
Dist checkpoints reshard, so the test reads every layout's gradients back at TP = PP = 1.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

from emu_mc.batch import Batch, synthetic_batch
from emu_mc.config import load_config
from emu_mc.parallel.groups import init_distributed
from emu_mc.parallel.setup import build_model_and_optimizer, forward_backward, unwrap
from emu_mc.tokenizer import load_tokenizer, special_token_ids

# Images per row of each global microbatch (2 rows each): 3 images (shares 2 + 1 at TP = 2), fewer
# images than TP ranks, none at all, then an even 4.
IMAGES_PER_ROW = [(2, 1), (1, 0), (0, 0), (2, 2)]


def split_into_documents(batch, ids, n_docs=3):
    """Cut each row's document into n_docs packed documents (between two text tokens, never inside an
    image block): segment ids 0..n_docs-1, positions restarting at each cut; the padding stays."""
    special = torch.tensor([ids.bos, ids.eos, ids.pad, ids.img_begin, ids.img_end, ids.img_slot])
    for row in range(batch.input_ids.shape[0]):
        text = ~torch.isin(batch.input_ids[row], special)
        candidates = (text[1:] & text[:-1]).nonzero().squeeze(1) + 1
        for d in range(1, n_docs):
            cut = int(candidates[d * len(candidates) // n_docs])
            real = batch.segment_ids[row, cut:] >= 0
            batch.segment_ids[row, cut:][real] = d
            batch.position_ids[row, cut:][real] -= batch.position_ids[row, cut]
    return batch


def global_batch(cfg, ids, vocab_size):
    """The fixed microbatches (rows of 3 packed documents + padding), the same in every layout."""
    g = torch.Generator().manual_seed(7)
    batches = []
    for counts in IMAGES_PER_ROW:
        rows = [synthetic_batch(ids, batch_size=1, seq_length=cfg.data.seq_length, vocab_size=vocab_size,
                                num_queries=cfg.model.resampler.num_queries, image_size=cfg.model.vision.image_size,
                                images_per_row=n, generator=g) for n in counts]
        batch = Batch(**{k: torch.cat([getattr(r, k) for r in rows]) for k in
                         ("input_ids", "position_ids", "segment_ids", "images")})
        batch.images = torch.randn(batch.images.shape, generator=g)
        batches.append(split_into_documents(batch, ids))
    return batches


def save_model(model, path):
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), path)


def complete_reduce_scattered_grads(chunk):
    """With the distributed optimizer each DP rank holds only its shard of the DP-reduced gradient
    buffer (reduce-scatter); all-gather the shards so every rank's `main_grad` is complete."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    dp, group = ps.get_data_parallel_world_size(), ps.get_data_parallel_group()
    if dp == 1 or not chunk.ddp_config.use_distributed_optimizer:
        return
    for buffer in chunk.buffers:
        for bucket in buffer.buckets:
            mine = shard_buffer(bucket.grad_data, dp)[ps.get_data_parallel_rank()].clone()
            dist.all_gather_into_tensor(bucket.grad_data, mine, group=group)


def replicas_identical(model, group) -> bool:
    """Whether every rank of `group` holds bit-identical values of the parameters given."""
    flat = torch.cat([p.detach().reshape(-1).float() for p in model]) if model else torch.zeros(1)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, flat, group=group)
    return all(torch.equal(gathered[0], t) for t in gathered)


def build(args, tp, pp, overrides):
    cfg = load_config("configs/tiny.yaml", [*args.set, *overrides, "--parallel.tensor_parallel", str(tp),
                                            "--parallel.pipeline_parallel", str(pp)])
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    ids = special_token_ids(tokenizer)
    chunks, optimizer = build_model_and_optimizer(cfg, ids, len(tokenizer))
    return cfg, ids, len(tokenizer), chunks, optimizer


def run_layout(args, run):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    dims = init_distributed(run["tp"], run["pp"], seed=1234)
    cfg, ids, vocab_size, chunks, optimizer = build(args, run["tp"], run["pp"], run.get("set", []))
    model = unwrap(chunks[0])
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.init))
    optimizer.reload_model_params()
    encoded = []
    if model.pre_process:
        model.vision.register_forward_pre_hook(lambda module, inputs: encoded.append(inputs[0].shape[0]))
    microbatches = global_batch(cfg, ids, vocab_size)
    per_rank = len(microbatches) // dims.dp
    dp_rank = ps.get_data_parallel_rank()
    loss, ce, reg = forward_backward(chunks, microbatches[dp_rank * per_rank:(dp_rank + 1) * per_rank]).tolist()
    complete_reduce_scattered_grads(chunks[0])

    out = os.path.join(args.out, run["name"])
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.main_grad)
    save_model(model, os.path.join(out, "grads"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])

    optimizer.step()
    replicated = [p for p in model.parameters() if not getattr(p, "tensor_model_parallel", False)]
    me = {"tp_rank": ps.get_tensor_model_parallel_rank(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
          "dp_rank": dp_rank, "images_encoded": sum(encoded), "llm_layers": len(model.llm.decoder.layers)}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, me)
    result = {
        "loss": loss, "ce": ce, "reg": reg, "ranks": ranks,
        "dp_replicas_identical": replicas_identical(list(model.parameters()), ps.get_data_parallel_group()),
        "tp_replicas_identical": replicas_identical(replicated, ps.get_tensor_model_parallel_group()),
    }
    if dist.get_rank() == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    ps.destroy_model_parallel()


def parse_args():
    """--init, --out, --save-init, --runs, --set as the module docstring says."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", required=True)
    parser.add_argument("--out")
    parser.add_argument("--save-init", action="store_true")
    parser.add_argument("--runs", type=json.loads, default=[])
    parser.add_argument("--set", type=json.loads, default=[])
    return parser.parse_args()


def main():
    from megatron.core import parallel_state as ps

    args = parse_args()

    if args.save_init:
        init_distributed(1, 1, seed=1234)
        save_model(unwrap(build(args, 1, 1, [])[3][0]), args.init)
        ps.destroy_model_parallel()
    for run in args.runs:
        run_layout(args, run)


if __name__ == "__main__":
    main()
