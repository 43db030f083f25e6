"""The Emu model: vision encoder -> causal resampler -> megatron-core LLM -> mixed loss."""
