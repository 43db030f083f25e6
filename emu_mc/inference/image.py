"""Image generation (docs/model.md, "Generation"): append [IMG] to the prompt, regress num_queries visual
embeddings one by one, each fed back as the input of the next <image> slot, then decode them with the
diffusion decoder (emu_mc/inference/decoder.py), with classifier-free guidance whose unconditional
branch is the same loop on an empty prompt.

Shapes: B rows, Q = num_queries, H LLM width.
"""
from typing import List, Optional, Tuple

import numpy as np
import torch

from emu_mc.batch import Batch
from emu_mc.inference.loading import LoadedEmu
from emu_mc.inference.prompts import PromptBuilder, Request
from emu_mc.inference.session import LLMSession, token_inputs
from emu_mc.inference.settings import ImageSettings


@torch.no_grad()
def regress_embeddings(model, batch: Batch, use_cache: bool = True) -> torch.Tensor:
    """A left-padded prompt Batch -> the Q regressed embeddings [B, Q, H]: those at [IMG] and at the
    first Q - 1 <image> slots, each slot's input being the embedding regressed one position before."""
    rows, q = batch.input_ids.shape[0], model.cfg.resampler.num_queries
    begin = torch.full((rows, 1), model.ids.img_begin, dtype=torch.long, device=batch.input_ids.device)
    inputs = torch.cat([model.embed(batch), token_inputs(model, begin)])  # prompt + [IMG]: [S + 1, B, H]
    valid = torch.cat([batch.segment_ids >= 0, torch.ones_like(begin, dtype=torch.bool)], 1)
    session = LLMSession(model.llm, rows, inputs.shape[0] + q - 1, use_cache=use_cache)
    hidden = session.feed(inputs, valid)[-1]
    embeddings = []
    for i in range(q):
        embeddings.append(model.regress_head(hidden))
        if i + 1 < q:
            hidden = session.feed(embeddings[-1][None], torch.ones_like(begin, dtype=torch.bool))[-1]
    return torch.stack(embeddings, 1)


@torch.no_grad()
def image_conditions(emu: LoadedEmu, requests: List[Request], settings: ImageSettings) -> tuple:
    """(conditional [B, Q, H], unconditional [B, Q, H] or None): one batch holding the requests and,
    when guidance_scale > 1, as many empty prompts (the unconditional branch)."""
    positions = emu.cfg.model.llm.max_position_embeddings
    q = emu.cfg.model.resampler.num_queries
    builder = PromptBuilder(emu.cfg, emu.tokenizer, emu.ids, emu.cfg.model.vision.image_size)
    guided = settings.guidance_scale > 1.0
    everything = list(requests) + ([Request("")] * len(requests) if guided else [])
    batch = builder.batch(everything, positions - q).to(emu.device)
    embeddings = regress_embeddings(emu.model, batch, use_cache=settings.use_cache)
    n = len(requests)
    return embeddings[:n], (embeddings[n:] if guided else None)


def generate_images(emu: LoadedEmu, decoder, requests: List[Request],
                    settings: Optional[ImageSettings] = None) -> Tuple[List[np.ndarray], Optional[List[bool]]]:
    """One image per request (uint8 [height, width, 3]; request i uses seed settings.seed + i), and the
    safety checker's flags (None without one)."""
    settings = (settings or ImageSettings()).validate()
    cond, uncond = image_conditions(emu, requests, settings)
    return decoder(cond, uncond, settings)
