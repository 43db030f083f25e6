"""Run converted LLM checkpoints in a TP x PP layout under torchrun (gloo) and write, per checkpoint:
  {name}_logits.pt            logits [B, S, V_padded] of the input ids (from the last stage's TP rank 0)
  {name}_gathered.safetensors gather_llm_state of the loaded model, vocab rows trimmed (from rank 0)
Usage: llm_worker.py --tp T --pp P --ids FILE --out DIR NAME=CKPT_DIR ...
Stages hand hidden states [S, B, H] to the next stage by point-to-point send/recv."""
import argparse
import os

import torch
import torch.distributed as dist

from emu_mc.convert import gather_llm_state, read_llm_checkpoint
from emu_mc.convert.tensor_files import write_safetensors
from emu_mc.parallel.groups import init_distributed
from tests.convert.llm_helpers import build_loaded_llm, stage_forward


def pipeline_logits(llm, ids: torch.Tensor):
    """Logits on the last stage, None elsewhere; hidden states travel stage to stage."""
    from megatron.core import parallel_state as ps

    hidden = None
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(ids.shape[1], ids.shape[0], llm.config.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
    out = stage_forward(llm, ids, hidden)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def main():
    from megatron.core import parallel_state as ps

    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ids", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("checkpoints", nargs="+", help="NAME=DIR")
    args = p.parse_args()
    init_distributed(tp=args.tp, pp=args.pp)
    ids = torch.load(args.ids)
    for item in args.checkpoints:
        name, ckpt = item.split("=", 1)
        llm = build_loaded_llm(ckpt)
        logits = pipeline_logits(llm, ids)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
            torch.save(logits, os.path.join(args.out, f"{name}_logits.pt"))
        gathered = gather_llm_state(llm, vocab_size=read_llm_checkpoint(ckpt)[2])
        if gathered is not None:
            write_safetensors(os.path.join(args.out, f"{name}_gathered.safetensors"), gathered)
    dist.barrier()


if __name__ == "__main__":
    main()
