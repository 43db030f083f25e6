"""Stage 2: train the visual decoder (a diffusion UNet) on Emu's regressed embeddings. Entry point:
emu_mc/train_decoder.py; config: emu_mc/decoder/config.py."""
