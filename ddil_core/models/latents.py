"""Images <-> diffusion latents with the VAE's own scaling (scaling_factor, and shift_factor or per-channel
latents_mean/latents_std when the VAE config has them), as the diffusers pipelines decode."""
from __future__ import annotations

import torch

from ddil_core.models import placement


def _stats(vae, like: torch.Tensor):
    cfg = vae.config
    scale = cfg.scaling_factor
    shift = getattr(cfg, "shift_factor", None) or 0.0
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        return (torch.tensor(mean, dtype=like.dtype, device=like.device).reshape(shape),
                torch.tensor(std, dtype=like.dtype, device=like.device).reshape(shape) / scale)
    return shift, 1.0 / scale


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> diffusion latents (the posterior mean; deterministic, so caches are reproducible)."""
    moments = vae.encode(images.to(*placement(vae))).latent_dist.mean
    shift, inv_scale = _stats(vae, moments)
    return (moments - shift) / inv_scale


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion latents -> images in [0, 1] ([B, 3, H, W] float32)."""
    shift, inv_scale = _stats(vae, latents)
    images = vae.decode((latents * inv_scale + shift).to(placement(vae)[1])).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)
