"""The visual decoder: a diffusers-format directory (unet/, vae/, scheduler/, optionally
safety_checker/ + feature_extractor/) whose UNet's cross-attention reads Emu's Q regressed embeddings
(width = the LLM width) instead of CLIP text states (docs/model.md, "Generation").

    decoder = VisualDecoder.load("sd-emu/", llm_width=5120)
    images, nsfw = decoder(cond, uncond, ImageSettings(guidance_scale=7.5, steps=50, seed=0))

The recipe, one method each: prepare latents (seeded, on the CPU, so a seed gives the same image on
any device) -> denoising loop with classifier-free guidance (noise = uncond + scale * (cond - uncond))
-> VAE decode with its scaling factor -> safety checker when the directory has one.
"""
import logging
import os
from typing import List, Optional, Tuple

import numpy as np
import torch

from emu_mc.inference.settings import GenerationInputError, ImageSettings

log = logging.getLogger("emu_mc.inference")
_LOCAL = {"local_files_only": True, "low_cpu_mem_usage": False}  # no hub, no accelerate
SCHEDULERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise GenerationInputError(f"--decoder {os.path.dirname(path) or path}: no {what} directory "
                                   f"({path}); expected a diffusers directory with unet/, vae/, scheduler/")


class VisualDecoder:
    def __init__(self, directory: str, unet, vae, scheduler, safety_checker=None, feature_extractor=None):
        self.directory = directory
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.safety_checker, self.feature_extractor = safety_checker, feature_extractor
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def load(cls, directory: str, llm_width: int, device=None, dtype=torch.float32) -> "VisualDecoder":
        """Load the components by name from `directory`; refuse a UNet whose cross_attention_dim is not
        the LLM width."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        for sub in ("unet", "vae", "scheduler"):
            _require_dir(os.path.join(directory, sub), sub)
        unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet", **_LOCAL, torch_dtype=dtype)
        width = unet.config.cross_attention_dim
        if width != llm_width:
            raise GenerationInputError(
                f"--decoder {directory}: its UNet's cross_attention_dim is {width}, but the model's LLM width is "
                f"{llm_width}; use a decoder trained on this model's embeddings")
        vae = AutoencoderKL.from_pretrained(directory, subfolder="vae", **_LOCAL, torch_dtype=dtype)
        scheduler = _load_scheduler(directory, "pndm")
        checker = extractor = None
        if os.path.isdir(os.path.join(directory, "safety_checker")):
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
            from transformers import CLIPImageProcessor

            checker = StableDiffusionSafetyChecker.from_pretrained(directory, subfolder="safety_checker", **_LOCAL,
                                                                   torch_dtype=dtype).to(device).eval()
            extractor = CLIPImageProcessor.from_pretrained(directory, subfolder="feature_extractor",
                                                           local_files_only=True)
        decoder = cls(directory, unet.to(device).eval(), vae.to(device).eval(), scheduler, checker,
                      extractor)
        log.info("visual decoder %s: UNet %.1fM params, native size %d px, safety checker %s", directory,
                 sum(p.numel() for p in unet.parameters()) / 1e6, decoder.native_size, "on" if checker else "absent")
        return decoder

    @property
    def native_size(self) -> int:
        """The size the UNet was built for: sample_size x the VAE's downsampling (512 for SD v1.5)."""
        return self.unet.config.sample_size * self.vae_scale

    def prepare_latents(self, count: int, height: int, width: int, seed: int, steps: int) -> torch.Tensor:
        """Initial noise [count, C, height / f, width / f] for a `steps`-step schedule; row i drawn from
        seed + i."""
        self.scheduler.set_timesteps(steps, device=self.unet.device)  # Euler's initial sigma depends on it
        shape = (self.unet.config.in_channels, height // self.vae_scale, width // self.vae_scale)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(count)]
        return torch.stack(noise).to(self.unet.device, self.unet.dtype) * self.scheduler.init_noise_sigma

    def denoise(self, latents: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor],
                guidance_scale: float, steps: int) -> torch.Tensor:
        """The sampling loop; with `uncond`, both branches run in one UNet batch and are combined as
        uncond + guidance_scale * (cond - uncond). Restarts the scheduler (PNDM keeps history)."""
        states = cond if uncond is None else torch.cat([uncond, cond])
        states = states.to(self.unet.device, self.unet.dtype)
        self.scheduler.set_timesteps(steps, device=self.unet.device)
        for t in self.scheduler.timesteps:
            x = latents if uncond is None else torch.cat([latents, latents])
            noise = self.unet(self.scheduler.scale_model_input(x, t), t, encoder_hidden_states=states).sample
            if uncond is not None:
                noise_uncond, noise_cond = noise.chunk(2)
                noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]
        return latents

    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> float images [B, H, W, 3] in [0, 1]."""
        scaling = getattr(self.vae.config, "scaling_factor", 0.18215)
        images = self.vae.decode(latents / scaling).sample
        return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()

    def check_safety(self, images: np.ndarray) -> Tuple[np.ndarray, Optional[List[bool]]]:
        """Run the safety checker (it blacks out flagged images); flags None when there is none."""
        if self.safety_checker is None:
            return images, None
        pixels = self.feature_extractor([(im * 255).round().astype(np.uint8) for im in images], return_tensors="pt")
        clip_input = pixels.pixel_values.to(self.safety_checker.device, self.safety_checker.dtype)
        images, flags = self.safety_checker(images=images, clip_input=clip_input)
        return images, [bool(f) for f in flags]

    @torch.no_grad()
    def __call__(self, cond: torch.Tensor, uncond: Optional[torch.Tensor],
                 settings: ImageSettings) -> Tuple[List[np.ndarray], Optional[List[bool]]]:
        """cond, uncond [B, Q, H] (uncond None: no guidance) -> (uint8 images [height, width, 3], nsfw
        flags or None)."""
        height, width = settings.height or self.native_size, settings.width or self.native_size
        for name, value in (("height", height), ("width", width)):
            if value % self.vae_scale:
                raise GenerationInputError(f"{name} {value}: must be a multiple of {self.vae_scale} for this decoder")
        self.scheduler = _load_scheduler(self.directory, settings.scheduler) \
            if _scheduler_name(self.scheduler) != settings.scheduler else self.scheduler
        latents = self.prepare_latents(cond.shape[0], height, width, settings.seed, settings.steps)
        latents = self.denoise(latents, cond, uncond, settings.guidance_scale, settings.steps)
        images, flags = self.check_safety(self.decode_latents(latents))
        return [(im * 255).round().astype(np.uint8) for im in images], flags


def _scheduler_name(scheduler) -> str:
    return {v: k for k, v in SCHEDULERS.items()}.get(type(scheduler).__name__, "")


def _load_scheduler(directory: str, name: str):
    """The directory's scheduler config, run by the scheduler class `name` (pndm, ddim, euler)."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    config = cls.load_config(directory, subfolder="scheduler", local_files_only=True)
    return cls.from_config(config)
