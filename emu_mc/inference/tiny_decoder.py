"""Write a small random visual decoder (diffusers directory: unet/, vae/, scheduler/) for tests and the
demo: its UNet's cross_attention_dim is the given LLM width, so Emu's regressed embeddings condition it
directly. The images it makes are noise; the whole image path runs on a CPU in seconds.

    python -m emu_mc.inference.tiny_decoder OUT_DIR --cross-attention-dim 64 [--sample-size 16]
    python -m emu_mc.inference.tiny_decoder OUT_DIR --config configs/tiny.yaml   # width = model.llm.hidden_size
"""
import argparse
import sys


def write_tiny_decoder(out_dir: str, cross_attention_dim: int, sample_size: int = 16, seed: int = 0,
                       safety_checker: bool = False) -> str:
    """A UNet (2 levels, 32/64 channels, latent sample_size), a VAE (2 levels: images 2 x sample_size px)
    and a PNDM scheduler with SD v1.5's noise schedule, saved as safetensors under `out_dir`; with
    `safety_checker`, also a tiny CLIP safety checker and its feature extractor (it flags nothing)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    ).save_pretrained(f"{out_dir}/unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=2 * sample_size,
    ).save_pretrained(f"{out_dir}/vae")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1).save_pretrained(f"{out_dir}/scheduler")
    if safety_checker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPConfig, CLIPImageProcessor

        tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        config = CLIPConfig(text_config=tiny, vision_config={**tiny, "image_size": 32, "patch_size": 8},
                            projection_dim=16)
        StableDiffusionSafetyChecker(config).save_pretrained(f"{out_dir}/safety_checker")
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            f"{out_dir}/feature_extractor")
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    width = parser.add_mutually_exclusive_group(required=True)
    width.add_argument("--cross-attention-dim", type=int, help="the LLM width (model.llm.hidden_size)")
    width.add_argument("--config", help="a job config (YAML) whose model.llm.hidden_size to match")
    parser.add_argument("--sample-size", type=int, default=16, help="latent size; images are twice as large")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--safety-checker", action="store_true", help="add a tiny CLIP safety checker")
    args = parser.parse_args(argv)
    if args.config:
        from emu_mc.config import ConfigError, load_config

        try:
            args.cross_attention_dim = load_config(args.config).model.llm.hidden_size
        except (ConfigError, OSError) as err:
            print(f"tiny_decoder: --config {args.config}: {err}", file=sys.stderr)
            return 2
    if args.cross_attention_dim < 1 or args.sample_size < 4:
        print("tiny_decoder: --cross-attention-dim must be >= 1 and --sample-size >= 4", file=sys.stderr)
        return 2
    print(write_tiny_decoder(args.out_dir, args.cross_attention_dim, args.sample_size, args.seed, args.safety_checker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
