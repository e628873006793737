"""Sinusoidal embedding of the guidance scale, the student's timestep_cond input in LCM (Luo et al. 2023; as
diffusers' `get_guidance_scale_embedding`, after VDM's timestep embedding)."""
from __future__ import annotations

import math

import torch


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int = 256, dtype=torch.float32) -> torch.Tensor:
    """w [B] -> [B, embedding_dim]: sin/cos features of 1000 w at geometric frequencies."""
    w = torch.as_tensor(w).flatten() * 1000.0
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
