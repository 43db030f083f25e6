"""python -m emu_mc.convert {hf-to-emu, emu-to-hf, eva-to-emu, emu1-to-emu, emu-to-emu1, export,
sd-to-decoder} ... (see --help)."""
import argparse
import sys
from typing import Optional, Sequence

from emu_mc.convert.errors import ConversionError
from emu_mc.convert.eva import eva_to_emu
from emu_mc.convert.export import export_checkpoint
from emu_mc.convert.hf import emu_to_hf, hf_to_emu
from emu_mc.convert.llm_format import ARCH_FIELDS, META_FILE, WEIGHTS_FILE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m emu_mc.convert",
        description="Convert checkpoints between HF LLaMA / EVA-CLIP layouts and emu_mc's. Use the outputs "
                    "with --model.llm.init_from DIR and --model.vision.init_from FILE.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("hf-to-emu", help="HF LLaMA-family checkpoint dir -> our LLM checkpoint dir",
                       description=f"Reads config.json + model*.safetensors or pytorch_model*.bin (sharded index "
                                   f"files too) of a LlamaForCausalLM; writes {WEIGHTS_FILE} (megatron-core names, "
                                   f"TP=1, PP=1) and {META_FILE} (LLMConfig fields, vocab size).")
    s.add_argument("--hf", required=True, metavar="DIR", help="local HF checkpoint directory")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    s = sub.add_parser("emu-to-hf", help="our LLM checkpoint dir -> HF LlamaForCausalLM dir",
                       description="Writes config.json + model.safetensors loadable by "
                                   "transformers.LlamaForCausalLM.from_pretrained (tensors copied bit for bit).")
    s.add_argument("--emu", required=True, metavar="DIR", help=f"directory with {WEIGHTS_FILE} and {META_FILE}")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    s = sub.add_parser("eva-to-emu", help="EVA-CLIP vision weights -> our VisionTransformer safetensors",
                       description="Reads an EVA-CLIP / open_clip (visual.trunk.*) / timm Eva state dict (.pt, .pth, "
                                   ".bin or .safetensors); fuses q_bias/v_bias into qkv.bias with a zero k bias; "
                                   "drops the final norm and head. See emu_mc/convert/eva.py for the layouts.")
    s.add_argument("--eva", required=True, metavar="FILE", help="EVA-CLIP checkpoint file")
    s.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    s = sub.add_parser("emu1-to-emu", help="the released Emu-1 / Emu-I checkpoint -> our whole-model format",
                       description="Reads the released multimodal state dict (pytorch_model.bin, possibly under a "
                                   "'module' key) and writes a directory for --model.init_from DIR and for "
                                   "python -m emu_mc.generate --checkpoint DIR (layout: emu_mc/convert/emu1.py). "
                                   "The tokenizer written to DIR/tokenizer has the release's special-token ids.")
    s.add_argument("--emu1", required=True, metavar="FILE", help="released checkpoint file")
    s.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="the release's LLaMA tokenizer directory (Emu1/models/llama_config)")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    s.add_argument("--instruct", action="store_true", help="Emu-I: merge its peft LoRA (q, k, v, o) into the weights")
    s.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (Emu-I: 16; the rank is read off lora_A)")
    s.add_argument("--vision-head-dim", type=int, default=88, help="EVA head width (Emu-1: 88, i.e. 16 heads)")
    s.add_argument("--llm-head-dim", type=int, default=128, help="LLaMA head width (LLaMA-13B: 128, i.e. 40 heads)")
    s = sub.add_parser("emu-to-emu1", help="our whole-model format -> the released Emu-1 state dict",
                       description="Writes one torch.save'd state dict with the release's names (and vocab rows in "
                                   "the release's special-token order) that the released Emu code loads.")
    s.add_argument("--emu", required=True, metavar="DIR", help="a directory from export --to emu or emu1-to-emu")
    s.add_argument("--out", required=True, metavar="FILE", help="output .bin file")
    s.add_argument("--instruct", action="store_true",
                   help="Emu-I layout: peft-wrapped LLM with zero LoRA factors (the weights are already merged)")
    s = sub.add_parser("export", help="a pretraining checkpoint (any TP x PP) -> our whole-model format or HF LLaMA",
                       description="Loads the model of a pretraining checkpoint (a run's out_dir, its checkpoints/ "
                                   "or a step_N/ directory; any TP x PP x DP layout) in one process and writes "
                                   "--to emu: every component (emu_mc_model.json, llm.safetensors + "
                                   "emu_mc_llm.json, vision.safetensors, components.safetensors, tokenizer/), "
                                   "for --model.init_from DIR; --to hf: the LLM as a LlamaForCausalLM directory "
                                   "with the run's tokenizer (special tokens included).")
    s.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory, checkpoints/ or step_N/")
    s.add_argument("--to", required=True, choices=["emu", "hf"], help="output format")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    s = sub.add_parser("sd-to-decoder", help="a local diffusers Stable Diffusion dir -> a visual decoder dir",
                       description="Replaces the UNet's cross-attention key/value projections by new layers that "
                                   "take the LLM width (nn.Linear default init, seeded), sets cross_attention_dim, "
                                   "drops the text encoder and tokenizer, copies vae/, scheduler/ (and the safety "
                                   "checker). The result is train_decoder's decoder.init and generation's --decoder.")
    s.add_argument("--sd", required=True, metavar="DIR", help="local diffusers Stable Diffusion directory")
    s.add_argument("--llm-width", required=True, type=int, metavar="W", help="the LLM width (5120 for Emu-14B)")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    s.add_argument("--seed", type=int, default=0, help="seed of the new layers' init")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one conversion; prints what was written. Returns 0, or 2 on a ConversionError."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "hf-to-emu":
            cfg, vocab = hf_to_emu(args.hf, args.out)
            fields = ", ".join(f"{n}={getattr(cfg, n)}" for n in ARCH_FIELDS)
            print(f"wrote {args.out}: {fields}, vocab_size={vocab}")
        elif args.command == "emu-to-hf":
            cfg, vocab = emu_to_hf(args.emu, args.out)
            print(f"wrote {args.out}: LlamaForCausalLM, {cfg.num_layers} layers, vocab_size={vocab}")
        elif args.command == "emu1-to-emu":
            from emu_mc.convert.emu1 import describe, emu1_to_emu

            cfg, vocab, dropped = emu1_to_emu(args.emu1, args.out, args.tokenizer, instruct=args.instruct,
                                              lora_alpha=args.lora_alpha, vision_head_dim=args.vision_head_dim,
                                              llm_head_dim=args.llm_head_dim)
            print(f"wrote {args.out}: {describe(cfg)}, vocab_size={vocab}; dropped {len(dropped)} unused tensors "
                  f"({', '.join(dropped[:4])}{', ...' if len(dropped) > 4 else ''}); use --model.init_from {args.out} "
                  f"--model.tokenizer {cfg.tokenizer}, or python -m emu_mc.generate --checkpoint {args.out}")
        elif args.command == "emu-to-emu1":
            from emu_mc.convert.emu1 import emu_to_emu1

            count = emu_to_emu1(args.emu, args.out, instruct=args.instruct)
            print(f"wrote {args.out}: {count} tensors in the released Emu-1 layout")
        elif args.command == "eva-to-emu":
            shape = eva_to_emu(args.eva, args.out)
            print(f"wrote {args.out}: vision tower {shape} (set model.vision.num_heads yourself)")
        elif args.command == "sd-to-decoder":
            from emu_mc.convert.sd_decoder import sd_to_decoder

            summary = sd_to_decoder(args.sd, args.llm_width, args.out, args.seed)
            print(f"wrote {args.out}: {summary['new_layers']} new cross-attention k/v layers "
                  f"({summary['clip_width']} -> {args.llm_width} inputs; {summary['init']}); dropped "
                  f"{', '.join(summary['dropped']) or 'nothing'}")
        else:
            from emu_mc.pretrain import setup_logging

            setup_logging(0)  # megatron-core's known-harmless warnings off, as in a training run
            step_dir, step = export_checkpoint(args.checkpoint, args.to, args.out)
            use = "--model.init_from" if args.to == "emu" else "transformers.AutoModelForCausalLM.from_pretrained"
            print(f"wrote {args.out} from {step_dir} (step {step}); load it with {use}")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
