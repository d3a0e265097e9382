"""Classifier-free-guided inpainting with diffusers schedulers (DDIM by default).

Mirrors diffusers' ``PaintByExamplePipeline`` step for step (same latent draw, same
[uncond, cond] order, same channel layout), so an exported model reproduces our samples.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    SchedulerMixin,
    UNet2DConditionModel,
)

from pbe_lightning.models.backbone import vae_downscale

# set_alpha_to_one=False: the last step's "previous" alpha is alphas_cumprod[0], as in the
# public code's PLMS/DDIM samplers and Stable Diffusion's released scheduler configs.
SAMPLERS = {
    "ddim": (DDIMScheduler, {"set_alpha_to_one": False}),
    # skip_prk_steps: else set_timesteps(n) runs more than n steps
    "pndm": (PNDMScheduler, {"skip_prk_steps": True, "set_alpha_to_one": False}),
    "dpm": (DPMSolverMultistepScheduler, {}),
}


# How the pixel mask becomes the UNet's mask channel. bilinear: the public Paint-by-Example
# code's (torchvision Resize on a tensor: bilinear, no antialiasing), which samples the middle
# of each latent cell and keeps a soft edge; nearest: diffusers' pipeline's, which samples
# each cell's top-left pixel and is 0 or 1.
LATENT_MASK_MODES = ("bilinear", "nearest")


def latent_mask(mask: torch.Tensor, size: tuple[int, int] | torch.Size, mode: str) -> torch.Tensor:
    """``(B, 1, H, W)`` pixel mask -> ``(B, 1, *size)`` for the UNet's mask channel."""
    if mode not in LATENT_MASK_MODES:
        raise ValueError(f"model.latent_mask={mode!r}: use bilinear or nearest")
    if mode == "nearest":
        return F.interpolate(mask, size=size)
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=False, antialias=False)


def make_sampler(name: str, training_scheduler: SchedulerMixin) -> SchedulerMixin:
    """A sampling scheduler sharing the training noise schedule (betas, timesteps)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is unknown: use one of {sorted(SAMPLERS)}")
    cls, extra = SAMPLERS[name]
    return cls.from_config(training_scheduler.config, **extra)


def step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | None, eta: float) -> dict:
    """What ``PaintByExamplePipeline.prepare_extra_step_kwargs`` passes: only what ``step`` takes.

    PNDM's ``step`` takes neither ``eta`` nor ``generator``; DPM-Solver takes no ``eta``.
    """
    accepted = inspect.signature(scheduler.step).parameters
    extra = {"eta": eta, "generator": generator}
    return {name: value for name, value in extra.items() if name in accepted}


def encode_latents(
    vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents (a posterior sample, as in training and diffusers)."""
    posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    return posterior.sample(generator) * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


@torch.no_grad()
def paint(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    scheduler: SchedulerMixin,
    context: torch.Tensor,
    uncond: torch.Tensor,
    masked_image: torch.Tensor,
    mask: torch.Tensor,
    steps: int = 50,
    guidance_scale: float = 5.0,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    mask_mode: str = "nearest",
) -> torch.Tensor:
    """Paint the holes (``mask`` EDIT = 0) guided by ``context``; returns images in [-1, 1].
    ``mask_mode``: how the mask is resized to the latents (``latent_mask``)."""
    batch, device = masked_image.shape[0], masked_image.device
    height, width = (side // vae_downscale(vae) for side in masked_image.shape[-2:])
    shape = (batch, vae.config.latent_channels, height, width)
    scheduler.set_timesteps(steps, device=device)
    latents = torch.randn(shape, generator=generator, device=device, dtype=unet.dtype)
    latents = latents * scheduler.init_noise_sigma
    mask_latent = latent_mask(mask.to(unet.dtype), shape[-2:], mask_mode)
    masked_latents = encode_latents(vae, masked_image, generator).to(unet.dtype)
    guided = guidance_scale > 1.0
    if guided:
        context = torch.cat([uncond, context])
        mask_latent = torch.cat([mask_latent] * 2)
        masked_latents = torch.cat([masked_latents] * 2)
    extra = step_kwargs(scheduler, generator, eta)
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        model_input = torch.cat([model_input, masked_latents, mask_latent], dim=1)
        eps = unet(model_input, t, encoder_hidden_states=context).sample
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, **extra).prev_sample
    return decode_latents(vae, latents)
