"""Consistency-model boundary scalings and the multistep consistency step (Song et al. 2023; LCM, Luo et al. 2023;
code: diffusers examples/consistency_distillation/train_lcm_distill_sd_wds.py, scalings_for_boundary_conditions)."""
from __future__ import annotations

import torch


def consistency_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """c_skip = sd^2 / ((10 t)^2 + sd^2), c_out = 10 t / sqrt((10 t)^2 + sd^2); c_skip(0) = 1, c_out(0) = 0."""
    scaled = torch.as_tensor(t, dtype=torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_function(x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, sigma_data: float = 0.5,
                         timestep_scaling: float = 10.0) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t)."""
    c_skip, c_out = consistency_scalings(t, sigma_data, timestep_scaling)
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    return c_skip.reshape(shape).to(x_t) * x_t + c_out.reshape(shape).to(x_t) * x0_hat
