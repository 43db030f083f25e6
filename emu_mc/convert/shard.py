"""Full (TP=1, PP=1) LLM state dict <-> this rank's shard of a megatron-core GPTModel, any TP x PP
(its base weights: LoRA adapters are left out both ways).

Sharding is read off each parameter as megatron-core marks it: `tensor_model_parallel`,
`partition_dim` (0: column-parallel rows, 1: row-parallel columns) and `partition_stride` (2 for
SwiGLU fc1, whose full [gate; up] is held per rank as [gate shard r; up shard r]). The fused QKV is
laid out per query group, so its TP shard is a contiguous block of whole groups (stride 1).
Vocab-parallel embedding/output: the full tensor's rows are zero-padded to the model's padded vocab
before slicing. Pipeline stages hold their own layers (global index = local + offset, read from
megatron's 1-based `layer_number`), the embedding on the first stage, final norm + output layer on
the last; with tied embeddings the last stage's output layer is loaded from the embedding.
"""
import re
from typing import Dict, Optional

import torch
import torch.distributed as dist

from emu_mc.convert.errors import ConversionError, check_keys, check_shape
from emu_mc.convert.llm_format import EMBEDDING, OUTPUT, add_vocab_rows, full_names
from emu_mc.convert.tensor_files import StateDict

VOCAB_PARALLEL = (EMBEDDING, OUTPUT)
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def shard_tensor(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s shard: each of `stride` equal blocks along `dim` split into `size` parts."""
    return torch.cat([block.chunk(size, dim)[rank] for block in full.chunk(stride, dim)], dim)


def unshard_tensor(shards, dim: int, stride: int) -> torch.Tensor:
    """Inverse of shard_tensor over all ranks' shards (in rank order)."""
    blocks = [shard.chunk(stride, dim) for shard in shards]
    return torch.cat([blocks[r][j] for j in range(stride) for r in range(len(shards))], dim)


def _global_names(gpt_model) -> Dict[str, str]:
    """This rank's parameter name -> its name in the full state dict (pipeline layer offset applied);
    LoRA adapters (emu_mc/model/lora.py) are not part of it."""
    from emu_mc.model.lora import is_adapter

    layers = gpt_model.decoder.layers
    offset = layers[0].layer_number - 1 if len(layers) else 0

    def rename(name):
        m = _LAYER.fullmatch(name)
        return f"decoder.layers.{int(m[1]) + offset}.{m[2]}" if m else name
    return {name: rename(name) for name, _ in gpt_model.named_parameters() if not is_adapter(name)}


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _split(param) -> Optional[tuple]:
    """(partition_dim, partition_stride) of a tensor-parallel parameter, None if replicated."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return param.partition_dim, param.partition_stride


def _pad_vocab(name: str, full: torch.Tensor, rows: int) -> torch.Tensor:
    if full.shape[0] > rows:
        raise ConversionError(f"{name}: checkpoint has {full.shape[0]} vocab rows, more than the model's {rows}")
    return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])


@torch.no_grad()
def load_llm_state(gpt_model, full: StateDict, vocab_size: Optional[int] = None) -> None:
    """Copy this rank's shard of `full` (a full TP=1 state dict, llm_format.py names) into `gpt_model`'s
    parameters. Vocab rows may be fewer than the model's padded vocab: with `vocab_size` (the model's
    real vocabulary) the missing rows below it start at the mean row (`add_vocab_rows`); the rest are zero."""
    if vocab_size is not None:
        full = add_vocab_rows(full, vocab_size)
    tied = gpt_model.share_embeddings_and_output_weights
    check_keys(full_names(gpt_model.config.num_layers, tied), list(full), "LLM state dict")
    rank, size = _tp()
    params = dict(gpt_model.named_parameters())
    for name, global_name in _global_names(gpt_model).items():
        param, source = params[name], EMBEDDING if tied and global_name == OUTPUT else global_name
        tensor, split = full[source], _split(param)
        expected = list(param.shape)
        if split is not None:
            expected[split[0]] *= size
        if global_name in VOCAB_PARALLEL:
            check_shape(source, [tensor.shape[0], *expected[1:]], tensor.shape, " (vocab rows aside)")
            tensor = _pad_vocab(source, tensor, expected[0])
        check_shape(source, expected, tensor.shape, f" for this rank's {name}")
        param.copy_(tensor if split is None else shard_tensor(tensor, *split, rank, size))


@torch.no_grad()
def gather_llm_state(gpt_model, vocab_size: Optional[int] = None, everywhere: bool = False) -> Optional[StateDict]:
    """The inverse of load_llm_state: the full TP=1 state dict (CPU tensors, padded vocab rows kept
    unless `vocab_size` trims them), assembled over the TP and PP groups. Every rank must call it;
    the result is returned on the first TP and PP rank (of each data-parallel replica), or on every
    rank when `everywhere`, else None."""
    from megatron.core import parallel_state as ps

    tied = gpt_model.share_embeddings_and_output_weights
    rank, size = _tp()
    params = dict(gpt_model.named_parameters())
    stage: StateDict = {}
    for name, global_name in _global_names(gpt_model).items():
        if tied and global_name == OUTPUT:
            continue  # the last stage's copy of the embedding
        tensor, split = params[name].detach().contiguous(), _split(params[name])
        if split is not None and size > 1:
            shards = [torch.empty_like(tensor) for _ in range(size)]
            dist.all_gather(shards, tensor, group=ps.get_tensor_model_parallel_group())
            tensor = unshard_tensor(shards, *split)
        if global_name in VOCAB_PARALLEL and vocab_size is not None:
            tensor = tensor[:vocab_size]
        stage[global_name] = tensor.cpu().clone()
    full = stage
    if ps.get_pipeline_model_parallel_world_size() > 1:
        stages = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, stage, group=ps.get_pipeline_model_parallel_group())
        full = {k: v for s in stages for k, v in s.items()}
    first = rank == 0 and ps.get_pipeline_model_parallel_rank() == 0
    return full if everywhere or first else None
