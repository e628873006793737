"""Reflected diffusion by thresholding x0 estimates (DDIL paper: "we adopt reflected diffusion formulation";
Lou and Ermon 2023), discretised as thresholding of the x0 estimate after each step (docs/method.md section 2).

Two forms, both exactly as diffusers' schedulers compute them, so a student whose rollouts were thresholded in
training is sampled the same way by its saved scheduler:
- static: clamp x0 to [-b, b] (DDIMScheduler/LCMScheduler `clip_sample` with `clip_sample_range` b); here b may
  also be a per-channel tensor [C] (used on the teacher's side only: a scheduler clips one scalar range);
- dynamic (Imagen, Saharia et al. 2022; diffusers `DDPMScheduler._threshold_sample`): per sample
  s = clamp(quantile(|x0|, p), min=1, max=max_value), x0 = clamp(x0, -s, s) / s.
  The division by s maps x0 into [-1, 1]: meant for data in [-1, 1] (pixels); on latents it rescales them.
`reflect` also recomputes eps from the thresholded x0, so a teacher DDIM step stays on a consistent (x0, eps) pair;
the student's sampler keeps the network's eps, as diffusers' DDIMScheduler.step does (method/rollouts.py).
"""
from __future__ import annotations

import torch


def threshold_x0(x0: torch.Tensor, mode: str, bound=None, percentile: float = 0.995,
                 max_value: float = 1.0) -> torch.Tensor:
    """Clamp x0 into its support. mode "off": unchanged; "static": clamp to [-bound, bound] (a float or a
    per-channel tensor [C]); "dynamic": diffusers' _threshold_sample with dynamic_thresholding_ratio = percentile
    and sample_max_value = max_value."""
    if mode == "off":
        return x0
    if mode == "static":
        if bound is None:
            raise ValueError("static reflection needs a bound (a number or per-channel bounds)")
        b = torch.as_tensor(bound, dtype=x0.dtype, device=x0.device)
        if b.ndim == 1:  # per channel
            b = b.reshape(1, -1, *([1] * (x0.ndim - 2)))
        return torch.maximum(torch.minimum(x0, b), -b)
    if mode == "dynamic":
        # diffusers schedulers/scheduling_ddpm.py _threshold_sample: quantile in float32 over all but the batch
        # dimension, s floored at 1 and capped at sample_max_value, clamp on both sides, divide by s.
        flat = x0.detach().reshape(x0.shape[0], -1).float()
        s = torch.quantile(flat.abs(), percentile, dim=1).clamp(min=1.0, max=float(max_value))
        s = s.reshape(-1, *([1] * (x0.ndim - 1)))
        return (torch.maximum(torch.minimum(x0.float(), s), -s) / s).to(x0.dtype)
    raise ValueError(f"unknown reflection mode '{mode}'")


def reflect(x_t, x0, a, s, mode: str, bound=None, percentile: float = 0.995, max_value: float = 1.0):
    """Threshold x0 and recompute eps from it: returns (x0_reflected, eps_reflected)."""
    x0_r = threshold_x0(x0, mode, bound, percentile, max_value)
    return x0_r, (x_t - a * x0_r) / s
