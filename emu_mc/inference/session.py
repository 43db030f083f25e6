"""The model side of generation: input embeddings in, final-norm hidden states out, with a KV cache
(emu_mc/inference/kv_cache.py) or by recomputing the whole sequence with the training forward each
step (what the released Emu code does; kept as the reference and for benchmarks).

Shapes: B rows, S positions, H LLM width, V vocabulary (the tokenizer's, without padding rows).
"""
import torch

from emu_mc.inference.kv_cache import cached_hidden_states, new_cache, recomputed_hidden_states
from emu_mc.model.llm import output_weight


class LLMSession:
    """One batch of left-padded rows being extended. `feed` appends positions, `reorder` keeps or
    repeats rows (beam search)."""

    def __init__(self, llm, batch: int, capacity: int, use_cache: bool = True):
        self.llm = llm
        self.cache = new_cache(llm, batch, capacity) if use_cache else None
        self.inputs = None  # without a cache: every input so far [S, B, H] and valid [B, S]
        self.valid = None

    def feed(self, inputs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """inputs [S, B, H] (input embeddings), valid [B, S] bool (False = left padding) -> hidden [S, B, H]."""
        if self.cache is not None:
            return cached_hidden_states(self.llm, inputs, valid, self.cache)
        self.inputs = inputs if self.inputs is None else torch.cat([self.inputs, inputs])
        self.valid = valid if self.valid is None else torch.cat([self.valid, valid], 1)
        return recomputed_hidden_states(self.llm, self.inputs, self.valid)[-inputs.shape[0]:]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` [B'] long, in that order (repeats allowed)."""
        if self.cache is not None:
            self.cache.reorder(rows)
        else:
            self.inputs = self.inputs.index_select(1, rows)
            self.valid = self.valid.index_select(0, rows)


def token_inputs(model, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, S] long -> input embeddings [S, B, H] (RoPE is applied in attention, so the embedding's
    position ids are unused)."""
    return model.llm.embedding(input_ids=tokens, position_ids=torch.zeros_like(tokens))


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden [B, H] -> next-token logits [B, V] fp32 (the padding rows of the vocab cut off),
    the same on every TP rank (each computes its vocab shard, then they are gathered)."""
    logits = hidden @ output_weight(model.llm).t()
    if model.tp_size > 1:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits = gather_from_tensor_model_parallel_region(logits)
    return logits.float()[:, :model.vocab_size]
