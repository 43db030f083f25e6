"""Emu: images -> ViT -> ln_visual -> causal resampler -> <image> slots of the LLM input -> LLM ->
regression head + mixed loss (docs/model.md, "Components" and "The objective").

Shapes: B rows of S tokens, N images, Q = num_queries slots per image, H = LLM width.
The megatron LLM works sequence-first ([S, B, H]); flattened rows are s-major (index s * B + b), so
the next position of flat row i is i + B.

One class serves every parallel layout (emu_mc/parallel/ applies the layouts):
- tensor parallel: the LLM is megatron-sharded; vision, ln_visual, resampler and regress_head are
  replicated on every TP rank. With `split_vision` each TP rank encodes only its share of the
  microbatch's images and the visual embeddings are all-gathered (emu_mc/parallel/vision_split.py;
  the training setup then sums the vision gradients over TP); otherwise every TP rank encodes every
  image. The regression head sees identical inputs on every TP rank (see `loss`).
- pipeline parallel: a stage holds vision + ln_visual + resampler + embedding when `pre_process`
  (first stage), its share of the LLM layers, and regress_head + loss when `post_process` (last).
  `forward` returns the hidden states on every stage but the last. The regression targets are
  input embeddings, known only on the first stage: `reg_target_channel` (set by
  emu_mc.parallel.pipeline) carries them to the last stage.
"""
import dataclasses
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils.checkpoint import checkpoint
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from emu_mc.batch import Batch
from emu_mc.config import ModelConfig
from emu_mc.model.llm import build_llm, llm_hidden_states, output_weight, padded_vocab_size, transformer_config
from emu_mc.model.loss import mixed_loss_fn
from emu_mc.model.resampler import CausalResampler
from emu_mc.model.targets import IGNORE_INDEX, check_image_blocks, flat_text_targets, regression_rows
from emu_mc.model.vision import VisionTransformer
from emu_mc.tokenizer import SpecialTokenIds


class EmuModel(MegatronModule):
    def __init__(self, cfg: ModelConfig, ids: SpecialTokenIds, vocab_size: int, *, tp: int = 1, pp: int = 1,
                 pre_process: bool = True, post_process: bool = True, params_dtype=torch.float32,
                 recompute: bool = False, recompute_vision: bool = False, split_vision: bool = True,
                 stage_layers: tuple = (None, None), lora=None):
        """`recompute`: the LLM's layers are recomputed in backward; `recompute_vision`: each ViT block
        and the resampler. `split_vision` (TP > 1): each TP rank encodes its share of the images.
        `stage_layers`: (first, last) pipeline stage LLM layer counts (PP > 1; None = an even share).
        `lora` (LoRASettings, emu_mc/model/lora.py): LoRA adapters on the LLM's attention q, k, v, o,
        the only trainable parameters (their init: emu_mc.model.lora.init_adapters)."""
        config = transformer_config(cfg.llm, init_std=cfg.init_std, params_dtype=params_dtype,
                                    recompute=recompute, tp=tp, pp=pp)
        if pp > 1 and stage_layers != (None, None):
            config = dataclasses.replace(config, num_layers_in_first_pipeline_stage=stage_layers[0],
                                         num_layers_in_last_pipeline_stage=stage_layers[1])
        super().__init__(config=config)  # megatron's DDP, schedules and checkpointing read .config
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.cfg, self.ids, self.vocab_size, self.lora = cfg, ids, vocab_size, lora
        self.pre_process, self.post_process = pre_process, post_process
        self.reg_target_channel = None  # set by emu_mc.parallel.pipeline when PP > 1
        self.split_vision = split_vision and tp > 1
        self.recompute_vision = recompute_vision
        self.vision_timer = None  # a RegionTimer (emu_mc.metrics) set by the training setup
        self._vision_backward_hook = None
        hidden = cfg.llm.hidden_size
        if pre_process:
            self.vision = VisionTransformer(cfg.vision, cfg.init_std, recompute=recompute_vision)
            self.ln_visual = nn.LayerNorm(cfg.vision.width, eps=cfg.vision.norm_eps)
            self.resampler = CausalResampler(cfg.resampler, cfg.vision.width, hidden, cfg.init_std)
        self.llm = build_llm(
            cfg.llm, padded_vocab_size(vocab_size, cfg.llm.make_vocab_size_divisible_by, tp),
            init_std=cfg.init_std, pre_process=pre_process, post_process=post_process,
            params_dtype=params_dtype, recompute=recompute, tp=tp, pp=pp, config=config, lora=lora,
        )
        if post_process:
            # nn.Linear's default init, as the release's stu_regress_head
            self.regress_head = nn.Linear(hidden, hidden, bias=False)
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
        if self.lora is not None:
            from emu_mc.model.lora import freeze_all_but_adapters

            freeze_all_but_adapters(self)

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

    def vision_parameters(self):
        """The parameters of the vision side (ViT, ln_visual, resampler); none off the first stage."""
        if not self.pre_process:
            return []
        return [*self.vision.parameters(), *self.ln_visual.parameters(), *self.resampler.parameters()]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, s, s] -> visual embeddings [N, Q, H] in causal order (all N on this process)."""
        visual = self.ln_visual(self.vision(images))
        if self.recompute_vision and torch.is_grad_enabled():
            return checkpoint(self.resampler, visual, use_reentrant=False)
        return self.resampler(visual)

    def visual_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, s, s] -> [N, Q, H] on every TP rank. With `split_vision` this rank encodes
        only its share (emu_mc.parallel.vision_split.image_shares) and the shares are all-gathered."""
        if not self.split_vision:
            return self._timed_encode(images)
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        from emu_mc.parallel.vision_split import gather_image_shares, image_shares

        rank = parallel_state.get_tensor_model_parallel_rank()
        sizes = image_shares(images.shape[0], self.tp_size)
        start = sum(sizes[:rank])
        with get_cuda_rng_tracker().fork():  # the resampler's dropout: one random stream per TP rank
            local = self._timed_encode(images[start:start + sizes[rank]])
        return gather_image_shares(local, sizes, rank, parallel_state.get_tensor_model_parallel_group())

    def _timed_encode(self, images: torch.Tensor) -> torch.Tensor:
        """encode_images, timed forward and backward by `vision_timer` when set; an empty share
        ([0, 3, s, s]) gives [0, Q, H] without running the encoder."""
        if images.shape[0] == 0:
            return images.new_zeros(0, self.cfg.resampler.num_queries, self.cfg.llm.hidden_size)
        timer = self.vision_timer
        if timer is None:
            return self.encode_images(images)
        timer.start()
        visual = self.encode_images(images)
        timer.stop()
        if visual.requires_grad:  # backward: from the embeddings' gradient to the last vision weight's
            visual.register_hook(lambda grad: timer.start())
            trainable = [p for p in self.vision_parameters() if p.requires_grad]
            if self._vision_backward_hook is None and trainable:
                self._vision_backward_hook = register_multi_grad_hook(trainable, lambda grads: timer.stop())
        return visual

    def embed(self, batch: Batch) -> torch.Tensor:
        """Token embeddings with each image's Q <image> slots overwritten by its visual embeddings:
        [S, B, H]."""
        check_image_blocks(batch.input_ids, batch.images.shape[0], self.cfg.resampler.num_queries, self.ids)
        tokens = self.llm.embedding(input_ids=batch.input_ids, position_ids=batch.position_ids)  # [S, B, H]
        if batch.images.shape[0] == 0:
            return tokens
        visual = self.visual_embeddings(batch.images.to(tokens.dtype))
        slots = (batch.input_ids == self.ids.img_slot)[..., None]  # [B, S, 1]; images in b-major order
        return tokens.transpose(0, 1).masked_scatter(slots, visual.to(tokens.dtype)).transpose(0, 1).contiguous()

    def regression_index(self, batch: Batch) -> torch.Tensor:
        """reg_index [R]: the regression positions as s-major flat rows (s * B + b)."""
        return regression_rows(batch, self.ids) if batch.regression_rows is None else batch.regression_rows

    def regression_targets(self, decoder_input: torch.Tensor, batch: Batch):
        """(reg_index [R] into s-major flat rows, reg_targets [R, H] detached input embeddings of p+1)."""
        hidden = decoder_input.shape[-1]
        reg_index = self.regression_index(batch)
        batch_size = batch.input_ids.shape[0]
        reg_targets = decoder_input.reshape(-1, hidden)[reg_index + batch_size].detach()
        return reg_index, reg_targets

    def loss(self, hidden: torch.Tensor, batch: Batch, reg_index, reg_targets) -> Dict[str, torch.Tensor]:
        """hidden [S, B, H] (final-norm) -> {'loss', 'ce', 'reg'} fp32 scalars.

        With TP > 1 the output layer is vocab-sharded and the regression rows are split over the TP
        ranks: the gradient w.r.t. `hidden` is a partial sum per rank (its vocab shard's CE share, its
        regression rows), so `hidden` enters through the TP copy region, whose backward all-reduces it
        over TP; the loss sums the regression head's gradient over the ranks itself. Values and
        gradients equal the TP=1 ones.
        """
        targets = flat_text_targets(batch, self.ids) if batch.text_targets is None else batch.text_targets
        tp_group = None
        flat = hidden.reshape(-1, hidden.shape[-1])
        if self.tp_size > 1:
            from megatron.core import parallel_state
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            tp_group = parallel_state.get_tensor_model_parallel_group()
            flat = copy_to_tensor_model_parallel_region(flat)
        total, ce, reg = self.loss_fn(
            flat, output_weight(self.llm), targets, self.regress_head.weight, reg_index, reg_targets,
            ce_loss_weight=self.cfg.loss.ce_weight, reg_loss_weight=self.cfg.loss.reg_weight,
            ignore_index=IGNORE_INDEX, valid_vocab_size=self.vocab_size, tp_group=tp_group,
            text_index=batch.text_rows,  # the CE's rows when the training loop found them; else every row
        )
        return {"loss": total, "ce": ce, "reg": reg}

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """batch -> {'loss', 'ce', 'reg'} on the last pipeline stage (the only stage without PP);
        the hidden states [S, B, H] for the next stage on every other stage."""
        decoder_input: Optional[torch.Tensor] = None
        if self.pre_process:
            decoder_input = self.embed(batch)
            reg_index, reg_targets = self.regression_targets(decoder_input, batch)
            if (self.lora is not None and self.config.recompute_granularity and torch.is_grad_enabled()
                    and not decoder_input.requires_grad):
                # a frozen embedding gives an input without grad; megatron's recompute (a reentrant
                # autograd Function) would then pass no gradient to the adapters inside it
                decoder_input.requires_grad_(True)
            if not self.post_process:
                self.reg_target_channel.send(reg_targets)
        hidden = llm_hidden_states(self.llm, decoder_input, batch.position_ids, batch.segment_ids)
        if not self.post_process:
            return hidden
        if not self.pre_process:
            reg_index = self.regression_index(batch)
            reg_targets = self.reg_target_channel.recv(reg_index.numel(), hidden.shape[-1], hidden.dtype)
        return self.loss(hidden, batch, reg_index, reg_targets)
