"""The demo's AutoencoderKL: training, and a per-channel latent normalisation folded into its weights.

docs/demo.md: trained with MSE + 0.5 L1 + 1e-4 KL, the digit latents are far from zero mean (about -1.9, std 2.5),
so a single scaling_factor cannot make them ~N(0, 1). Diffusers' StableDiffusionPipeline decodes
`latents / scaling_factor` and ignores shift_factor and latents_mean/std, so instead of storing statistics we fold
them into the weights: with per-channel mean m and std s of the posterior means,

    quant_conv (mean rows):   W' = W / s,          b' = (b - m) / s        -> the new mean is (mu - m) / s
    quant_conv (logvar rows): b' = b - 2 log s                              -> the posterior std scales alike
    post_quant_conv:          W' = W * s (per input channel),  b' = b + W m -> decodes (z' s + m) as before

and scaling_factor = 1. Any diffusers pipeline then encodes to ~N(0, 1) latents per channel and decodes them.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch.nn import functional as F

from ddil_core.demo.training import train_steps, warmup_cosine
from ddil_core.models.tiny import tiny_vae

log = logging.getLogger(__name__)
L1_WEIGHT = 0.5
KL_WEIGHT = 1e-4
WARMUP_STEPS = 50


def train_vae(images: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
              max_seconds: Optional[float] = None, adapt_threads: bool = False,
              workers: int = 1) -> tuple[torch.nn.Module, dict]:
    """Train tiny_vae() on images [N, 3, 16, 16] in [-1, 1] in `workers` data-parallel threads (parallel.py);
    deterministic for a seed and a worker count (until a guard stops it; bit-exact only without adapt_threads, see
    ThreadTuner)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = tiny_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = (vae.config.latent_channels, images.shape[-2] // down, images.shape[-1] // down)

    def batch_at(step: int) -> tuple[torch.Tensor, ...]:
        x = images[torch.randint(len(images), (batch_size,), generator=g)]
        return x, torch.randn((batch_size, *latent), generator=g)  # the posterior sample's noise

    def loss_of(model, x, eps) -> torch.Tensor:
        posterior = model.encode(x).latent_dist
        recon = model.decode(posterior.mean + posterior.std * eps).sample
        return F.mse_loss(recon, x) + L1_WEIGHT * F.l1_loss(recon, x) + KL_WEIGHT * posterior.kl().mean()

    # Linear warm-up, then cosine decay to 5% of lr.
    info = train_steps("vae", vae, opt, steps, lambda step: warmup_cosine(step, steps, lr, WARMUP_STEPS, 0.05),
                       batch_at, loss_of, (0.95, 0.05), max_seconds, adapt_threads, workers=workers)
    return vae.eval().requires_grad_(False), info


@torch.no_grad()
def posterior_means(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)])


@torch.no_grad()
def fold_latent_normalization(vae, images: torch.Tensor) -> dict:
    """Make the VAE's posterior means ~N(0, 1) per channel over `images` by rewriting quant_conv, post_quant_conv
    and scaling_factor (see the module docstring). Decoding is unchanged up to float rounding. Returns the
    statistics that were folded."""
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("the VAE has no quant_conv/post_quant_conv to fold the latent statistics into")
    mu = posterior_means(vae, images)
    m = mu.mean(dim=(0, 2, 3))
    s = mu.std(dim=(0, 2, 3)).clamp_min(1e-6)
    c = m.numel()
    q = vae.quant_conv  # Conv2d(2c, 2c, 1): rows [:c] mean, [c:] logvar
    q.weight[:c] /= s.view(c, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - m) / s
    q.bias[c:] -= 2 * torch.log(s)
    p = vae.post_quant_conv  # Conv2d(c, c, 1)
    p.bias += (p.weight[:, :, 0, 0] @ m)
    p.weight *= s.view(1, c, 1, 1)
    vae.register_to_config(scaling_factor=1.0)
    return {"channel_mean": m.tolist(), "channel_std": s.tolist()}


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior-mean reconstructions in [-1, 1]."""
    out = []
    for i in range(0, len(images), batch_size):
        out.append(vae.decode(vae.encode(images[i:i + batch_size]).latent_dist.mean).sample.clamp(-1, 1))
    return torch.cat(out)
