"""The teacher's version of each step of a student's shipped sampler: what step k should have done from x.

- An interval sampler (DDIM, the progressive-distillation students) moves x from t_k to where the scheduler lands
  (t - T // N): the reference is the teacher's own guided DDIM over that interval, with rollouts.teacher_steps / N
  steps of its own (as method/rollouts.py teacher_interval_step, the target PD trains toward).
- A consistency sampler (LCM, DMD2, TCD) jumps to a clean estimate and re-noises it: the reference is the same
  scheduler step with the teacher's clean estimate (its guided DDIM from x down to 0 through the remaining
  intervals) in place of the student's, and the same noise.
Used by the covariate-shift measurement (metrics/covariate_shift.py, stages/diagnose.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from ddil_core.math.parameterization import to_model_output
from ddil_core.math.schedule import NoiseSchedule
from ddil_core.method.grid import StudentGrid
from ddil_core.method.rollouts import teacher_interval_step
from ddil_core.models.conditioning import Cond, index_cond
from ddil_core.models.denoiser import Denoiser
from ddil_core.models.sampling import ShippedSampler, is_interval_sampler


class TeacherReference:
    """The teacher's version of the shipped sampler's step k (see the module docstring)."""

    def __init__(self, sampler: ShippedSampler, teacher_unet, teacher_schedule: NoiseSchedule, cond: Cond,
                 uncond: Optional[Cond], guidance_scale: float, teacher_steps: int):
        self.sampler = sampler
        self.cond = cond
        self.grid = StudentGrid.from_timesteps(sampler.timesteps)
        # the teacher over one interval of the grid with teacher_steps / N guided DDIM steps of its own
        self.interval_step = teacher_interval_step(Denoiser(teacher_unet, teacher_schedule), int(teacher_steps),
                                                   uncond, guidance_scale)
        self.interval = is_interval_sampler(sampler.scheduler)
        if self.interval:  # DDIM lands on t - T // N: the scheduler's own transitions, not the next grid point
            T = teacher_schedule.num_train_timesteps
            nxt = [t - T // sampler.steps for t in sampler.timesteps]
            self.grid = StudentGrid(tuple(sampler.timesteps), tuple(nxt[:-1]) + (-1,))

    def _ode(self, x: torch.Tensor, start: int, end: int, rows: torch.Tensor) -> torch.Tensor:
        """The teacher's guided DDIM from grid point `start` through the intervals before `end`."""
        cond = index_cond(self.cond, rows)
        for k in range(start, end):
            x = self.interval_step(x, self.grid, k, cond)
        return x

    @torch.no_grad()
    def step(self, x: torch.Tensor, k: int, rows: torch.Tensor) -> torch.Tensor:
        if self.interval:
            return self._ode(x, k, k + 1, rows)
        x0 = self._ode(x, k, self.grid.num_steps, rows)  # the teacher's clean estimate from (x, t_k)
        schedule = self.sampler.schedule
        t = torch.full((x.shape[0],), self.sampler.timesteps[k], device=x.device, dtype=torch.long)
        a, s = schedule.alpha_sigma(t, like=x)
        eps = (x - a * x0) / s
        out = to_model_output(x0, eps, a, s, schedule.prediction_type)
        return self.sampler.step(x, k, rows, model_output=out.to(x.dtype))
