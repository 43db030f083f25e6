"""Checkpoint conversion (HF LLaMA <-> ours, EVA-CLIP -> ours) and loading into any TP x PP layout.

CLI: `python -m emu_mc.convert --help`. Library: `load_llm_state` / `gather_llm_state` (full TP=1
LLM state dict <-> this rank's GPTModel shard), `load_vision_state`, `load_pretrained` (applies
model.llm.init_from / model.vision.init_from).
"""
from emu_mc.convert.errors import ConversionError
from emu_mc.convert.eva import eva_to_emu
from emu_mc.convert.hf import emu_to_hf, hf_to_emu
from emu_mc.convert.llm_format import read_llm_checkpoint, write_llm_checkpoint
from emu_mc.convert.pretrained import load_pretrained, load_vision_state
from emu_mc.convert.shard import gather_llm_state, load_llm_state

__all__ = ["ConversionError", "eva_to_emu", "emu_to_hf", "hf_to_emu", "read_llm_checkpoint",
           "write_llm_checkpoint", "load_pretrained", "load_vision_state", "gather_llm_state", "load_llm_state"]
