"""The decoder's condition, computed by the frozen Emu (docs/model.md "Visual decoder training").

Conditional: Emu reads `<s> caption [IMG] <image>xQ [/IMG]` with the image's own visual embeddings in
the Q slots (teacher forcing); the regression head at [IMG] and at the first Q - 1 <image> slots gives
the Q embeddings, as generation's regression loop (emu_mc/inference/image.py) would if every
regressed embedding it fed back were the image's true one. One forward, no loop.
Unconditional: exactly generation's guidance branch, the regression loop on an empty prompt.

Shapes: B pairs, S positions, Q = num_queries, H LLM width.
"""
import torch

from emu_mc.batch import Batch
from emu_mc.inference.image import regress_embeddings
from emu_mc.inference.kv_cache import recomputed_hidden_states
from emu_mc.inference.prompts import PromptBuilder, Request


@torch.no_grad()
def teacher_forced_conditions(model, batch: Batch) -> torch.Tensor:
    """A left-padded Batch whose rows end with one image block ([IMG] <image>xQ [/IMG]) -> the Q
    regressed embeddings [B, Q, H] at [IMG] and the first Q - 1 <image> slots, in the model's dtype."""
    q = model.cfg.resampler.num_queries
    begin = batch.input_ids.shape[1] - q - 2
    if begin < 0 or not bool((batch.input_ids[:, begin] == model.ids.img_begin).all()):
        raise ValueError("teacher_forced_conditions: every row must end with its image block ([IMG] <image>xQ [/IMG])")
    hidden = recomputed_hidden_states(model.llm, model.embed(batch), batch.segment_ids >= 0)  # [S, B, H]
    return model.regress_head(hidden[begin:begin + q]).transpose(0, 1).contiguous()


@torch.no_grad()
def unconditional_condition(emu) -> torch.Tensor:
    """Generation's unconditional condition [1, Q, H]: the regression loop on an empty prompt."""
    builder = PromptBuilder(emu.cfg, emu.tokenizer, emu.ids, emu.cfg.model.vision.image_size)
    batch = builder.batch([Request("")], emu.cfg.model.llm.max_position_embeddings).to(emu.device)
    return regress_embeddings(emu.model, batch)


def drop_conditions(cond: torch.Tensor, uncond: torch.Tensor, prob: float, generator: torch.Generator):
    """Replace each row of cond [B, Q, H] by uncond [1, Q, H] with probability `prob` (draws from the CPU
    `generator`). Returns (conditions [B, Q, H], dropped [B] bool)."""
    dropped = torch.rand(cond.shape[0], generator=generator) < prob
    mask = dropped.to(cond.device)[:, None, None]
    return torch.where(mask, uncond.to(cond.dtype).expand_as(cond), cond), dropped
