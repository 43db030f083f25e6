"""python -m emu_mc.convert {hf-to-emu, emu-to-hf, eva-to-emu} ... (see --help)."""
import argparse
import sys
from typing import Optional, Sequence

from emu_mc.convert.errors import ConversionError
from emu_mc.convert.eva import eva_to_emu
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
        else:
            shape = eva_to_emu(args.eva, args.out)
            print(f"wrote {args.out}: vision tower {shape} (set model.vision.num_heads yourself)")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
