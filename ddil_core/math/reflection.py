"""Reflected diffusion by thresholding x0 estimates (DDIL paper: "we adopt reflected diffusion formulation";
Lou and Ermon 2023). Discretised as Imagen-style thresholding of x0 followed by recomputing eps, so the DDIM step
stays on a consistent (x0, eps) pair (method.md section 2; diffusers DDIMScheduler._threshold_sample for the
dynamic percentile)."""
from __future__ import annotations

import torch


def threshold_x0(x0: torch.Tensor, mode: str, bound=None, percentile: float = 0.995) -> torch.Tensor:
    """Clamp x0 into its support.

    mode "off": unchanged. "static": clamp to [-bound, bound], bound a float or a per-channel tensor [C].
    "dynamic": per sample, s = quantile(|x0|, percentile) clamped to at least `bound` (1 by default, as Imagen),
    then clamp to [-s, s]. Values already inside the bound are never changed.
    """
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
        flat = x0.detach().abs().reshape(x0.shape[0], -1).float()
        s = torch.quantile(flat, percentile, dim=1)
        floor = 1.0 if bound is None else float(torch.as_tensor(bound).max())
        s = s.clamp(min=floor).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, s), -s)
    raise ValueError(f"unknown reflection mode '{mode}'")


def reflect(x_t, x0, a, s, mode: str, bound=None, percentile: float = 0.995):
    """Threshold x0 and recompute eps from it: returns (x0_reflected, eps_reflected)."""
    x0_r = threshold_x0(x0, mode, bound, percentile)
    return x0_r, (x_t - a * x0_r) / s
