"""Reverse-process rollouts: the teacher's DDIM sampler and the student's own few-step sampler, both with optional
reflection of x0 (method.md section 2). Batched over samples; the prefix of a student rollout runs without
gradient (code: DMD2 backward simulation, tianweiy/DMD2 main/sd_unified_model.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ddil_core.math.ddim import ddim_step
from ddil_core.math.reflection import reflect
from ddil_core.models.conditioning import Cond
from ddil_core.models.denoiser import Denoiser


@dataclass
class Reflection:
    """Where and how x0 estimates are thresholded; `bound` is a float or a per-channel tensor."""

    mode: str = "off"
    bound: Optional[torch.Tensor | float] = None
    percentile: float = 0.995

    def __call__(self, x_t, x0, eps, a, s):
        if self.mode == "off":
            return x0, eps
        return reflect(x_t, x0, a, s, self.mode, self.bound, self.percentile)


NO_REFLECTION = Reflection()


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, prev_timesteps: torch.Tensor,
                cond: Cond, uncond: Optional[Cond] = None, guidance_scale: float = 1.0,
                reflection: Reflection = NO_REFLECTION, record: Optional[Callable[[int, torch.Tensor], None]] = None,
                timestep_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deterministic DDIM from x at timesteps[0] through the grid; `record(i, x)` sees the input state of step i.
    Returns the final state (the clean sample when the last prev timestep is negative)."""
    schedule = denoiser.schedule
    for i, (t, t_prev) in enumerate(zip(timesteps.tolist(), prev_timesteps.tolist())):
        if record is not None:
            record(i, x)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps = denoiser.x0_eps(x, tt, cond, uncond, guidance_scale, timestep_cond)
        a, s = schedule.alpha_sigma(tt, like=x)
        x0, eps = reflection(x, x0, eps, a, s)
        a_prev, s_prev = schedule.alpha_sigma(torch.full_like(tt, t_prev), like=x)
        x = ddim_step(x0, eps, a_prev, s_prev)
    return x


@torch.no_grad()
def student_rollout(step_fn: Callable, noise: torch.Tensor, num_steps: int, cond: Cond) -> torch.Tensor:
    """Run the student's own sampler for `num_steps` of its grid from pure noise, without gradient:
    the state the student visits at inference before its step `num_steps` (DDIL's student-backward source).
    `step_fn(x, k, cond)` performs student step k."""
    x = noise
    for k in range(num_steps):
        x = step_fn(x, k, cond)
    return x


def teacher_interval_step(denoiser: Denoiser, grid, substeps: int, uncond: Optional[Cond], guidance_scale: float,
                          reflection: Reflection = NO_REFLECTION) -> Callable:
    """A step function taking the teacher over student grid interval k (t_k -> next t) with `substeps` of its own
    guided DDIM steps: the teacher's part of DDIL's mixed teacher/student rollouts."""

    def step(x: torch.Tensor, k: int, cond: Cond) -> torch.Tensor:
        start, end = grid.steps[k], grid.next_steps[k]
        points = torch.linspace(start, max(end, 0), substeps + 1).round().long()
        ts, prev = points[:-1], points[1:].clone()
        if end < 0:
            prev[-1] = end  # the last interval ends at the clean sample
        return ddim_sample(denoiser, x, ts, prev, cond, uncond, guidance_scale, reflection)

    return step


@torch.no_grad()
def consistency_sample(denoiser: Denoiser, x: torch.Tensor, timesteps: list[int], cond: Cond,
                       generators: list[torch.Generator], uncond: Optional[Cond] = None, guidance_scale: float = 1.0,
                       timestep_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multistep consistency sampling (LCMScheduler.step): at each timestep jump to f(x, t) = c_skip x + c_out x0,
    then re-noise to the next timestep with fresh noise from each sample's own generator; the last jump is final."""
    from ddil_core.math.consistency import consistency_function

    schedule = denoiser.schedule
    for i, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        x0, _ = denoiser.x0_eps(x, tt, cond, uncond, guidance_scale, timestep_cond)
        denoised = consistency_function(x, x0, tt)
        if i == len(timesteps) - 1:
            return denoised
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x)
        x = schedule.add_noise(denoised, noise, torch.full_like(tt, int(timesteps[i + 1])))
    return x
