"""The deterministic DDIM step (Song et al. 2021, eq. 12 with eta = 0)."""
from __future__ import annotations

import torch

from ddil_core.math.parameterization import to_x0_eps


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, a_prev: torch.Tensor, s_prev: torch.Tensor) -> torch.Tensor:
    """x_prev = a_prev x0 + s_prev eps: the next state on the DDIM path of (x0, eps)."""
    return a_prev * x0 + s_prev * eps


def ddim_step_from_output(model_output, x_t, t, t_prev, schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from a raw network output; returns (x_prev, x0). Matches DDIMScheduler.step(eta=0)."""
    a, s = schedule.alpha_sigma(t, like=x_t)
    a_prev, s_prev = schedule.alpha_sigma(t_prev, like=x_t)
    x0, eps = to_x0_eps(model_output, x_t, a, s, schedule.prediction_type)
    return ddim_step(x0, eps, a_prev, s_prev), x0
