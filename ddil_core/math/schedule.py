"""DDPM noise schedules on the integer training grid t = 0..T-1, and the DDIM inference grids.

a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t) (docs/method.md section 3). Computed in float32 exactly as diffusers'
DDPMScheduler/DDIMScheduler do, so our samplers match theirs to float32 rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def _betas(config: dict) -> torch.Tensor:
    T = config.get("num_train_timesteps", 1000)
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float32)
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float32)
    if kind == "scaled_linear":  # Stable Diffusion
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":  # Nichol and Dhariwal 2021
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    raise ValueError(f"unsupported beta_schedule '{kind}' in the scheduler config")


@dataclass
class NoiseSchedule:
    alphas_cumprod: torch.Tensor  # [T] float32
    final_alpha_cumprod: float  # abar used for the step past t = 0
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(cls, config: dict, set_alpha_to_one: bool | None = None) -> "NoiseSchedule":
        """From a diffusers scheduler config (a dict, e.g. `scheduler.config`)."""
        if config.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr schedules are not supported yet")
        abar = torch.cumprod(1.0 - _betas(dict(config)), dim=0)
        one = config.get("set_alpha_to_one", True) if set_alpha_to_one is None else set_alpha_to_one
        final = 1.0 if one else float(abar[0])
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type '{prediction}' in the scheduler config")
        return cls(abar, final, prediction)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t for integer t; t < 0 means the clean end of the chain (final_alpha_cumprod)."""
        t = torch.as_tensor(t)
        table = self.alphas_cumprod.to(t.device)
        out = table[t.clamp(min=0).long()]
        return torch.where(t < 0, torch.full_like(out, self.final_alpha_cumprod), out)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t), shaped to broadcast against `like` ([B, C, H, W]) when given."""
        abar = self.abar(t)
        a, s = abar.sqrt(), (1.0 - abar).sqrt()
        if like is not None:
            shape = (-1,) + (1,) * (like.ndim - 1)
            a, s = a.reshape(shape).to(like.dtype), s.reshape(shape).to(like.dtype)
        return a, s

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar(t)
        return abar / (1.0 - abar).clamp(min=1e-20)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t, like=x0)
        return a * x0 + s * noise


def ddim_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "trailing", steps_offset: int = 0) -> torch.Tensor:
    """The descending DDIM grid, as diffusers' DDIMScheduler.set_timesteps builds it."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps = {num_steps} must be in [1, {num_train_timesteps}]")
    if spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = num_train_timesteps // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        ts = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    else:
        raise ValueError(f"unknown timestep_spacing '{spacing}'")
    return torch.from_numpy(ts)


def ddim_prev_timestep(t: torch.Tensor, num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """DDIM's previous timestep (diffusers: t - T // N); negative means 'past the end' (clean)."""
    return torch.as_tensor(t) - num_train_timesteps // num_steps
