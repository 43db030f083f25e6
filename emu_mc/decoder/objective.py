"""The decoder's training objective: the diffusion noise-prediction MSE on VAE latents.

    latents = VAE(pixels).sample * scaling_factor;  t ~ U{0, T-1};  noise ~ N(0, I)
    noisy = sqrt(a_t) latents + sqrt(1 - a_t) noise   (the scheduler's training noise schedule)
    target = noise (epsilon) or sqrt(a_t) noise - sqrt(1 - a_t) latents (v_prediction)
    loss = mean((UNet(noisy, t, cond) - target)^2)

Shapes: B pairs, R resolution, f the VAE's downsampling, C latent channels, Q x H the condition.
"""
import torch
import torch.nn.functional as F


@torch.no_grad()
def vae_posterior(vae, pixels: torch.Tensor):
    """pixels [B, 3, R, R] in [-1, 1] -> the VAE posterior's (mean, std), float32 [B, C, R/f, R/f] each."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float,
                   generator: torch.Generator) -> torch.Tensor:
    """A draw of the posterior (noise from the CPU `generator`) scaled by the VAE's factor: float32 [B, C, h, w]."""
    noise = torch.randn(mean.shape, generator=generator).to(mean)
    return (mean + std * noise) * scaling_factor


def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator,
                   autocast_dtype=None) -> torch.Tensor:
    """latents float32 [B, C, h, w], cond [B, Q, H] -> the fp32 scalar MSE of the UNet's prediction against
    the target of noise_scheduler.config.prediction_type; timesteps and noise drawn from the CPU `generator`."""
    rows = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    steps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (rows,), generator=generator)
    steps = steps.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, steps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, steps)
    else:
        target = noise
    with torch.autocast(latents.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        prediction = unet(noisy, steps, encoder_hidden_states=cond).sample
    return F.mse_loss(prediction.float(), target.float())
