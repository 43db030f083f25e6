"""Shared by the conversion tests and their torchrun workers: a tiny random HF LLaMA, our GPTModel
built from a converted checkpoint for this rank's TP x PP shard, and its logits."""
from typing import Optional

import torch
import torch.distributed as dist

from emu_mc.convert import load_llm_state, read_llm_checkpoint
from emu_mc.model.llm import build_llm, llm_hidden_states, output_weight, padded_vocab_size

VOCAB = 100  # not a multiple of the padding multiple below
PAD_MULTIPLE = 64
BATCH, SEQ = 2, 12


def make_hf_llama(out_dir, *, tied: bool = False, rope_theta: float = 10000.0, seed: int = 0,
                  dtype: torch.dtype = torch.float32, **save_kwargs):
    """A random 2-layer GQA LlamaForCausalLM (hidden 64, 4 heads, 2 kv heads), saved to out_dir.
    Weights are large enough (std 0.15, norm weights around 1 +- 0.3) that attention is far from
    uniform, so a RoPE or head-layout mistake moves the logits well past the tolerance."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=rope_theta, tie_word_embeddings=tied,
                      initializer_range=0.15, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    model = model.to(dtype)
    model.save_pretrained(out_dir, **save_kwargs)
    return model


def input_ids(seed: int = 1) -> torch.Tensor:
    """[BATCH, SEQ] token ids covering the vocab."""
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def build_loaded_llm(ckpt_dir: str):
    """This rank's GPTModel shard (current megatron TP x PP groups) with the checkpoint loaded."""
    from megatron.core import parallel_state as ps

    state, cfg, vocab = read_llm_checkpoint(ckpt_dir)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    llm = build_llm(cfg, padded_vocab_size(vocab, PAD_MULTIPLE, tp), tp=tp, pp=pp,
                    pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()).eval()
    load_llm_state(llm, state)
    return llm


@torch.no_grad()
def stage_forward(llm, ids: torch.Tensor, hidden_in: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One pipeline stage: ids [B, S] (first stage) or hidden_in [S, B, H] (later stages) ->
    hidden [S, B, H], or on the last stage the logits [B, S, V_padded] gathered over TP."""
    from megatron.core import parallel_state as ps

    positions = torch.arange(ids.shape[1]).expand_as(ids)
    decoder_input = llm.embedding(input_ids=ids, position_ids=positions) if llm.pre_process else None
    if not llm.pre_process:
        llm.set_input_tensor(hidden_in)
    hidden = llm_hidden_states(llm, decoder_input, positions, torch.zeros_like(ids))
    if not llm.post_process:
        return hidden
    local = (hidden @ output_weight(llm).t()).transpose(0, 1).contiguous()  # [B, S, V_local]
    shards = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, local, group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


@torch.no_grad()
def hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    return hf_model(input_ids=ids).logits.float()
