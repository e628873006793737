"""The student's timestep grid: the timesteps it is sampled on and the timestep each step lands on.

PD students use trailing DDIM spacing with diffusers' DDIMScheduler transitions (t -> t - T // N), so a written
student runs unchanged with the saved scheduler; for N dividing T into whole steps (1, 2, 4, 8 on T = 1000) the
next state lands exactly on the next grid timestep, and the grids of N and of any multiple of N nest, so teacher
rollouts with M = c N steps pass through them. LCM and DMD2 students step from grid point to grid point
(LCMScheduler), with a clean sample after the last.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddil_core.math.schedule import ddim_prev_timestep, ddim_timesteps


@dataclass(frozen=True)
class StudentGrid:
    steps: tuple[int, ...]  # descending timesteps t_0 > ... > t_{N-1}
    next_steps: tuple[int, ...]  # where each step lands; negative = the clean sample

    @classmethod
    def ddim_trailing(cls, num_train_timesteps: int, num_steps: int) -> "StudentGrid":
        ts = ddim_timesteps(num_train_timesteps, num_steps, "trailing")
        return cls(tuple(ts.tolist()), tuple(ddim_prev_timestep(ts, num_train_timesteps, num_steps).tolist()))

    @classmethod
    def from_timesteps(cls, timesteps: list[int]) -> "StudentGrid":
        """Grid point to grid point, then clean (the LCMScheduler's multistep sampling)."""
        ts = tuple(int(t) for t in timesteps)
        return cls(ts, ts[1:] + (-1,))

    @classmethod
    def lcm(cls, num_train_timesteps: int, num_steps: int, original_steps: int) -> "StudentGrid":
        """The grid LCMScheduler(original_inference_steps=original_steps).set_timesteps(num_steps) samples on."""
        return cls.from_timesteps(lcm_scheduler_timesteps(num_train_timesteps, num_steps, original_steps))

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def timesteps(self) -> torch.Tensor:
        return torch.tensor(self.steps)

    @property
    def prev_timesteps(self) -> torch.Tensor:
        return torch.tensor(self.next_steps)

    def position_in(self, other_timesteps: torch.Tensor) -> torch.Tensor:
        """Index of each of this grid's timesteps inside another grid; raises when one is missing."""
        pos = []
        for t in self.steps:
            hits = (other_timesteps == t).nonzero()
            if len(hits) == 0:
                raise ValueError(
                    f"the student grid timestep {t} is not in the teacher rollout grid {other_timesteps.tolist()}: "
                    "choose rollouts.teacher_steps so that the teacher's grid passes through the student's timesteps"
                )
            pos.append(int(hits[0]))
        return torch.tensor(pos)


def lcm_scheduler_timesteps(num_train_timesteps: int, num_steps: int, original_steps: int) -> list[int]:
    """diffusers' LCMScheduler inference timesteps for `num_steps` from its `original_steps`-step training grid."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(num_train_timesteps=num_train_timesteps, original_inference_steps=original_steps)
    scheduler.set_timesteps(num_steps)
    return [int(t) for t in scheduler.timesteps.tolist()]


def lcm_original_steps_for(timesteps: list[int], num_train_timesteps: int) -> int | None:
    """The original_inference_steps M for which LCMScheduler samples exactly `timesteps` when asked for
    len(timesteps) steps (so a saved scheduler reproduces them from num_inference_steps alone); None if no M does.
    Its first timestep is M * (T // M) - 1 (the top of the scheduler's M-step grid), which leaves few candidates."""
    n, top = len(timesteps), int(timesteps[0])
    for m in range(n, num_train_timesteps + 1):
        if m * (num_train_timesteps // m) - 1 == top and \
                lcm_scheduler_timesteps(num_train_timesteps, n, m) == [int(t) for t in timesteps]:
            return m
    return None
