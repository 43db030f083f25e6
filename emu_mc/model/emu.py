"""Emu: images -> ViT -> ln_visual -> causal resampler -> <image> slots of the LLM input -> LLM ->
regression head + mixed loss (SPEC, "Components" and "The objective").

Shapes: B rows of S tokens, N images, Q = num_queries slots per image, H = LLM width.
The megatron LLM works sequence-first ([S, B, H]); flattened rows are s-major (index s * B + b), so
the next position of flat row i is i + B.

One class serves every parallel layout (emu_mc/parallel/ applies the layouts):
- tensor parallel: the LLM is megatron-sharded; vision, ln_visual, resampler and regress_head are
  replicated on every TP rank (identical inputs give identical gradients, see `loss`).
- pipeline parallel: a stage holds vision + ln_visual + resampler + embedding when `pre_process`
  (first stage), its share of the LLM layers, and regress_head + loss when `post_process` (last).
  `forward` returns the hidden states on every stage but the last. The regression targets are
  input embeddings, known only on the first stage: `reg_target_channel` (set by
  emu_mc.parallel.pipeline) carries them to the last stage.
"""
from typing import Dict, Optional

import torch
import torch.nn as nn
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from emu_mc.batch import Batch
from emu_mc.config import ModelConfig
from emu_mc.model.llm import build_llm, llm_hidden_states, output_weight, padded_vocab_size, transformer_config
from emu_mc.model.loss import mixed_loss_fn
from emu_mc.model.resampler import CausalResampler
from emu_mc.model.targets import IGNORE_INDEX, check_image_blocks, regression_mask, text_targets
from emu_mc.model.vision import VisionTransformer
from emu_mc.tokenizer import SpecialTokenIds


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` in backward."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class EmuModel(MegatronModule):
    def __init__(self, cfg: ModelConfig, ids: SpecialTokenIds, vocab_size: int, *, tp: int = 1, pp: int = 1,
                 pre_process: bool = True, post_process: bool = True, params_dtype=torch.float32,
                 recompute: bool = False):
        config = transformer_config(cfg.llm, init_std=cfg.init_std, params_dtype=params_dtype,
                                    recompute=recompute, tp=tp, pp=pp)
        super().__init__(config=config)  # megatron's DDP, schedules and checkpointing read .config
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.cfg, self.ids, self.vocab_size = cfg, ids, vocab_size
        self.pre_process, self.post_process = pre_process, post_process
        self.reg_target_channel = None  # set by emu_mc.parallel.pipeline when PP > 1
        hidden = cfg.llm.hidden_size
        if pre_process:
            self.vision = VisionTransformer(cfg.vision, cfg.init_std)
            self.ln_visual = nn.LayerNorm(cfg.vision.width, eps=cfg.vision.norm_eps)
            self.resampler = CausalResampler(cfg.resampler, cfg.vision.width, hidden, cfg.init_std)
        self.llm = build_llm(
            cfg.llm, padded_vocab_size(vocab_size, cfg.llm.make_vocab_size_divisible_by, tp),
            init_std=cfg.init_std, pre_process=pre_process, post_process=post_process,
            params_dtype=params_dtype, recompute=recompute, tp=tp, pp=pp, config=config,
        )
        if post_process:
            self.regress_head = nn.Linear(hidden, hidden, bias=False)
            nn.init.normal_(self.regress_head.weight, std=cfg.init_std)
            self.loss_fn = mixed_loss_fn(cfg.loss.impl)
        # Every parameter in params_dtype, as megatron's Float16Module would leave them (its local-spec
        # norms are built in fp32); its distributed optimizer mis-maps checkpoint state for a parameter
        # group that mixes dtypes.
        self.to(params_dtype)
        self._apply_freezing()

    def _apply_freezing(self) -> None:
        if self.pre_process and self.cfg.vision.freeze:  # the ViT and ln_visual: the "vision" component
            self.vision.requires_grad_(False)
            self.ln_visual.requires_grad_(False)
        if self.pre_process and self.cfg.resampler.freeze:
            self.resampler.requires_grad_(False)
        if self.cfg.llm.freeze:
            self.llm.requires_grad_(False)

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron's pipeline schedules: the activation received from the previous stage."""
        self.llm.set_input_tensor(input_tensor)

    # megatron's finalize_model_grads finds the module holding `pre_process` (this one) and asks it
    # about the word embedding, to all-reduce tied embedding grads between first and last stage.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.llm.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.llm.shared_embedding_or_output_weight()

    @property
    def tp_size(self) -> int:
        return self.config.tensor_model_parallel_size

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

    def regression_index(self, batch: Batch) -> torch.Tensor:
        """reg_index [R]: the regression positions as s-major flat rows (s * B + b)."""
        return regression_mask(batch.input_ids, self.ids).t().reshape(-1).nonzero().squeeze(1)

    def regression_targets(self, decoder_input: torch.Tensor, batch: Batch):
        """(reg_index [R] into s-major flat rows, reg_targets [R, H] detached input embeddings of p+1)."""
        hidden = decoder_input.shape[-1]
        reg_index = self.regression_index(batch)
        batch_size = batch.input_ids.shape[0]
        reg_targets = decoder_input.reshape(-1, hidden)[reg_index + batch_size].detach()
        return reg_index, reg_targets

    def loss(self, hidden: torch.Tensor, batch: Batch, reg_index, reg_targets) -> Dict[str, torch.Tensor]:
        """hidden [S, B, H] (final-norm) -> {'loss', 'ce', 'reg'} fp32 scalars.

        With TP > 1 the output layer is vocab-sharded: the CE gradient w.r.t. `hidden` is a partial
        sum per rank and must be all-reduced over TP (megatron's column-parallel input region does
        that), while the regression term is computed in full on every TP rank. So `hidden` enters
        through the TP copy region and the regression term is weighted 1/tp for the backward (the
        all-reduce sums tp equal shares back to one); the regression head weight's gradient is
        scaled back by tp. Values and gradients equal the TP=1 ones; the reported loss is exact.
        """
        targets = text_targets(batch.input_ids, batch.segment_ids, self.ids).t().reshape(-1)
        tp, tp_group = self.tp_size, None
        flat = hidden.reshape(-1, hidden.shape[-1])
        head_weight = self.regress_head.weight
        reg_weight = self.cfg.loss.reg_weight
        if tp > 1:
            from megatron.core import parallel_state
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            tp_group = parallel_state.get_tensor_model_parallel_group()
            flat = copy_to_tensor_model_parallel_region(flat)
            head_weight = _ScaleGrad.apply(head_weight, float(tp))
            reg_weight = reg_weight / tp
        total, ce, reg = self.loss_fn(
            flat, output_weight(self.llm), targets, head_weight, reg_index, reg_targets,
            ce_loss_weight=self.cfg.loss.ce_weight, reg_loss_weight=reg_weight,
            ignore_index=IGNORE_INDEX, valid_vocab_size=self.vocab_size, tp_group=tp_group,
        )
        if tp > 1:  # report the true total; the backward keeps the 1/tp regression share
            total = total + (self.cfg.loss.reg_weight - reg_weight) * reg.detach()
        return {"loss": total, "ce": ce, "reg": reg}

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """batch -> {'loss', 'ce', 'reg'} on the last pipeline stage (the only stage without PP);
        the hidden states [S, B, H] for the next stage on every other stage."""
        decoder_input: Optional[torch.Tensor] = None
        if self.pre_process:
            decoder_input = self.embed(batch)
            reg_index, reg_targets = self.regression_targets(decoder_input, batch)
            if not self.post_process:
                self.reg_target_channel.send(reg_targets)
        hidden = llm_hidden_states(self.llm, decoder_input, batch.position_ids, batch.segment_ids)
        if not self.post_process:
            return hidden
        if not self.pre_process:
            reg_index = self.regression_index(batch)
            reg_targets = self.reg_target_channel.recv(reg_index.numel(), hidden.shape[-1], hidden.dtype)
        return self.loss(hidden, batch, reg_index, reg_targets)
