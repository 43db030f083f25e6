"""Emu: images -> ViT -> ln_visual -> causal resampler -> <image> slots of the LLM input -> LLM ->
regression head + mixed loss (SPEC, "Components" and "The objective").

Shapes: B rows of S tokens, N images, Q = num_queries slots per image, H = LLM width.
The megatron LLM works sequence-first ([S, B, H]); flattened rows are s-major (index s * B + b), so
the next position of flat row i is i + B.
"""
from typing import Dict

import torch
import torch.nn as nn

from emu_mc.batch import Batch
from emu_mc.config import ModelConfig
from emu_mc.model.llm import build_llm, document_causal_mask, llm_hidden_states, output_weight, padded_vocab_size
from emu_mc.model.loss import mixed_loss_fn
from emu_mc.model.resampler import CausalResampler
from emu_mc.model.targets import IGNORE_INDEX, check_image_blocks, regression_mask, text_targets
from emu_mc.model.vision import VisionTransformer
from emu_mc.tokenizer import SpecialTokenIds


class EmuModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ids: SpecialTokenIds, vocab_size: int, *, tp: int = 1, pp: int = 1,
                 pre_process: bool = True, post_process: bool = True, params_dtype=torch.float32,
                 recompute: bool = False):
        super().__init__()
        self.cfg, self.ids, self.vocab_size = cfg, ids, vocab_size
        self.pre_process, self.post_process = pre_process, post_process
        hidden = cfg.llm.hidden_size
        if pre_process:
            self.vision = VisionTransformer(cfg.vision, cfg.init_std)
            self.ln_visual = nn.LayerNorm(cfg.vision.width, eps=cfg.vision.norm_eps)
            self.resampler = CausalResampler(cfg.resampler, cfg.vision.width, hidden, cfg.init_std)
        self.llm = build_llm(
            cfg.llm, padded_vocab_size(vocab_size, cfg.llm.make_vocab_size_divisible_by, tp),
            init_std=cfg.init_std, pre_process=pre_process, post_process=post_process,
            params_dtype=params_dtype, recompute=recompute, tp=tp, pp=pp,
        )
        if post_process:
            self.regress_head = nn.Linear(hidden, hidden, bias=False)
            nn.init.normal_(self.regress_head.weight, std=cfg.init_std)
            self.loss_fn = mixed_loss_fn(cfg.loss.impl)
        self._apply_freezing()

    def _apply_freezing(self) -> None:
        if self.pre_process and self.cfg.vision.freeze:
            self.vision.requires_grad_(False)
        if self.pre_process and self.cfg.resampler.freeze:
            self.resampler.requires_grad_(False)
        if self.cfg.llm.freeze:
            self.llm.requires_grad_(False)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, s, s] -> visual embeddings [N, Q, H] in causal order."""
        return self.resampler(self.ln_visual(self.vision(images)))

    def embed(self, batch: Batch) -> torch.Tensor:
        """Token embeddings with each image's Q <image> slots overwritten by its visual embeddings:
        [S, B, H]."""
        check_image_blocks(batch.input_ids, batch.images.shape[0], self.cfg.resampler.num_queries, self.ids)
        tokens = self.llm.embedding(input_ids=batch.input_ids, position_ids=batch.position_ids)  # [S, B, H]
        if batch.images.shape[0] == 0:
            return tokens
        visual = self.encode_images(batch.images.to(tokens.dtype))
        slots = (batch.input_ids == self.ids.img_slot)[..., None]  # [B, S, 1]; images in b-major order
        return tokens.transpose(0, 1).masked_scatter(slots, visual.to(tokens.dtype)).transpose(0, 1).contiguous()

    def regression_targets(self, decoder_input: torch.Tensor, batch: Batch):
        """(reg_index [R] into s-major flat rows, reg_targets [R, H] detached input embeddings of p+1)."""
        hidden = decoder_input.shape[-1]
        reg_index = regression_mask(batch.input_ids, self.ids).t().reshape(-1).nonzero().squeeze(1)
        batch_size = batch.input_ids.shape[0]
        reg_targets = decoder_input.reshape(-1, hidden)[reg_index + batch_size].detach()
        return reg_index, reg_targets

    def loss(self, hidden: torch.Tensor, batch: Batch, reg_index, reg_targets) -> Dict[str, torch.Tensor]:
        """hidden [S, B, H] (final-norm) -> {'loss', 'ce', 'reg'} fp32 scalars."""
        targets = text_targets(batch.input_ids, batch.segment_ids, self.ids).t().reshape(-1)
        tp_group = None
        if self.llm.config.tensor_model_parallel_size > 1:
            from megatron.core import parallel_state
            tp_group = parallel_state.get_tensor_model_parallel_group()
        total, ce, reg = self.loss_fn(
            hidden.reshape(-1, hidden.shape[-1]), output_weight(self.llm), targets,
            self.regress_head.weight, reg_index, reg_targets,
            ce_loss_weight=self.cfg.loss.ce_weight, reg_loss_weight=self.cfg.loss.reg_weight,
            ignore_index=IGNORE_INDEX, valid_vocab_size=self.vocab_size, tp_group=tp_group,
        )
        return {"loss": total, "ce": ce, "reg": reg}

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """Single-stage forward (no pipeline parallelism): batch -> {'loss', 'ce', 'reg'}."""
        decoder_input = self.embed(batch)
        reg_index, reg_targets = self.regression_targets(decoder_input, batch)
        mask = document_causal_mask(batch.segment_ids)
        hidden = llm_hidden_states(self.llm, decoder_input, batch.position_ids, mask)
        return self.loss(hidden, batch, reg_index, reg_targets)
