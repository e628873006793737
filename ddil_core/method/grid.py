"""The student's timestep grid: trailing DDIM spacing on the teacher's training grid.

Transitions follow diffusers' DDIMScheduler (t -> t - T // N) so a written student runs unchanged with the saved
scheduler. For N dividing T into whole steps (1, 2, 4, 8 on T = 1000) the next state lands exactly on the next grid
timestep; the grids of N and of any multiple of N nest, so teacher rollouts with M = c N steps pass through them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddil_core.math.schedule import ddim_prev_timestep, ddim_timesteps


@dataclass(frozen=True)
class StudentGrid:
    num_train_timesteps: int
    num_steps: int

    @property
    def timesteps(self) -> torch.Tensor:
        """[N] descending: t_0 = T - 1, ..., t_{N-1}."""
        return ddim_timesteps(self.num_train_timesteps, self.num_steps, "trailing")

    @property
    def prev_timesteps(self) -> torch.Tensor:
        """[N] the timestep each step lands on (negative after the last: the clean sample)."""
        return ddim_prev_timestep(self.timesteps, self.num_train_timesteps, self.num_steps)

    def position_in(self, other_timesteps: torch.Tensor) -> torch.Tensor:
        """Index of each of this grid's timesteps inside another (finer) grid; raises when they do not nest."""
        pos = []
        for t in self.timesteps.tolist():
            hits = (other_timesteps == t).nonzero()
            if len(hits) == 0:
                raise ValueError(
                    f"the {self.num_steps}-step student grid timestep {t} is not in the rollout grid "
                    f"{other_timesteps.tolist()}: rollouts.teacher_steps must be a multiple of the student's steps"
                )
            pos.append(int(hits[0]))
        return torch.tensor(pos)
