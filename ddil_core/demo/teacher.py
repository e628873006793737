"""The demo teacher: a frozen random CLIP text encoder and a UNet2DConditionModel trained on normalised latents.

docs/demo.md: batch 64, AdamW lr 1e-3, Min-SNR-5 loss weighting (Hang et al. 2023) on epsilon prediction, an EMA
of the weights, 10% caption dropout for classifier-free guidance, SD's scaled_linear DDPM schedule; about 1,800
steps reach ~99% prompted-digit accuracy at 50 DDIM steps with guidance 2.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ddil_core.demo.training import train_steps, warmup_cosine
from ddil_core.math.schedule import NoiseSchedule
from ddil_core.models.tiny import _text_encoder, build_tokenizer, tiny_scheduler, tiny_unet
from ddil_core.training.ema import EMA

log = logging.getLogger(__name__)
WARMUP_STEPS = 100
EMA_WARMUP = 10  # decay = min(decay, (1 + n) / (EMA_WARMUP + n)): the average forgets the random init quickly


def build_text_encoder(seed: int = 0):
    """(tokenizer, a frozen randomly initialised CLIPTextModel of width 32 with 2 layers), deterministic."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    encoder = _text_encoder(tokenizer, with_projection=False).eval().requires_grad_(False)
    return tokenizer, encoder


@torch.no_grad()
def embed(tokenizer, encoder, prompts: list[str]) -> torch.Tensor:
    """Last hidden states [B, L, 32], as StableDiffusionPipeline.encode_prompt computes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids)[0]


# demo.unet -> where the (32, 64) UNet2DConditionModel attends to the prompt, with 2 heads (diffusers'
# attention_head_dim is the head count); "tiny-sd15" is tiny_unet("sd15") unchanged
UNET_KINDS = {
    "mid-attention": {"down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D"),
                      "attention_head_dim": 2},
    "light": {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "attention_head_dim": 2},
    "tiny-sd15": {},
}


def demo_unet(kind: str = "mid-attention"):
    """The teacher's UNet2DConditionModel (demo.unet). "mid-attention" (the default): (32, 64) channels, the prompt
    read by cross-attention in the 4x4 mid block only, 0.72M parameters: a ten-class prompt needs no more, and an
    update is 1.48x cheaper than "light"'s on one thread, at >= 98% prompted-digit accuracy (docs/demo.md).
    "light": cross-attention also at the 4x4 level of the down and up paths (0.99M). "tiny-sd15": tiny_unet("sd15"),
    attention at both levels with 8 heads (1.06M), the teacher of docs/results.md's evidence."""
    if kind not in UNET_KINDS:
        raise ValueError(f"demo.unet: {kind!r} (use one of {', '.join(UNET_KINDS)})")
    return tiny_unet("sd15", **UNET_KINDS[kind])


def train_teacher_unet(latents: torch.Tensor, labels: torch.Tensor, class_embeddings: torch.Tensor,
                       uncond_embedding: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 1e-3,
                       ema_decay: float = 0.999, min_snr_gamma: float = 5.0, caption_dropout: float = 0.1,
                       seed: int = 0, max_seconds: Optional[float] = None,
                       adapt_threads: bool = False, workers: int = 1,
                       unet: str = "mid-attention") -> tuple[torch.nn.Module, dict]:
    """Train demo_unet(unet) on latents [N, 4, 8, 8] (~N(0, 1)) conditioned on class_embeddings[labels] [10, L, D];
    a `caption_dropout` share of each batch gets the empty prompt's embedding. `workers` data-parallel threads
    (parallel.py). Returns the EMA UNet."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    unet = demo_unet(unet).train()
    schedule = NoiseSchedule.from_config(dict(tiny_scheduler().config))
    T = schedule.num_train_timesteps
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    ema = EMA(unet, ema_decay)
    uncond = uncond_embedding.reshape(1, *class_embeddings.shape[1:])

    def batch_at(step: int) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(len(latents), (batch_size,), generator=g)
        x0 = latents[idx]
        cond = class_embeddings[labels[idx]]
        drop = torch.rand(batch_size, generator=g) < caption_dropout
        cond = torch.where(drop.view(-1, 1, 1), uncond.expand_as(cond), cond)
        t = torch.randint(T, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return x0, cond, t, noise

    def loss_of(model, x0, cond, t, noise) -> torch.Tensor:
        x_t = schedule.add_noise(x0, noise, t)
        pred = model(x_t, t, encoder_hidden_states=cond).sample
        snr = schedule.snr(t)
        weight = snr.clamp(max=min_snr_gamma) / snr  # Min-SNR-gamma for epsilon prediction
        return (weight * (pred - noise).pow(2).flatten(1).mean(1)).mean()

    def update_ema(step: int) -> None:
        ema.decay = min(ema_decay, (1 + step) / (EMA_WARMUP + step))
        ema.update(unet)

    info = train_steps("teacher", unet, opt, steps, lambda step: warmup_cosine(step, steps, lr, WARMUP_STEPS, 0.1),
                       batch_at, loss_of, (0.98, 0.02), max_seconds, adapt_threads, after_update=update_ema,
                       workers=workers)
    ema.copy_to(unet)
    return unet.eval().requires_grad_(False), info
