"""The contract between the DDIL mixture, the objectives and the training loop: the state sources and the batch
types. The mixture (mixture.py) makes a StateBatch; an objective (objectives/) turns it into losses; the loop
(training/loop.py) accounts for it with the counts the batch carries."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ddil_core.models.conditioning import Cond

SOURCES = ("forward", "teacher", "student")
FORWARD, TEACHER, STUDENT = 0, 1, 2


@dataclass
class TeacherPairs:
    """DMD (v1)'s regression pairs: a state on the teacher's own deterministic trajectory (pure noise at its first
    step) and the image that trajectory ended at, with the rollout's prompt (tianweiy/DMD2 main/train_sd_ode.py,
    --denoising: one trajectory point per sample)."""

    x_t: torch.Tensor  # [B, C, H, W]
    t: torch.Tensor  # [B] a student grid timestep
    cond: Cond
    x0: torch.Tensor  # [B, C, H, W] the teacher's final sample

    def slice(self, start: int, end: int) -> "TeacherPairs":
        return TeacherPairs(self.x_t[start:end], self.t[start:end], {k: v[start:end] for k, v in self.cond.items()},
                            self.x0[start:end])

    def to(self, device) -> "TeacherPairs":
        return TeacherPairs(self.x_t.to(device), self.t.to(device), {k: v.to(device) for k, v in self.cond.items()},
                            self.x0.to(device))


@dataclass
class StateBatch:
    x_t: torch.Tensor  # [B, C, H, W]
    k: torch.Tensor  # [B] index of a forward state's timestep in the forward grid (bookkeeping only)
    t: torch.Tensor  # [B] timestep
    cond: Cond  # per-sample prompt embeddings
    source: torch.Tensor  # [B] 0 forward, 1 teacher, 2 student
    x0_real: torch.Tensor  # [B, C, H, W] the batch's real latents (DMD2's GAN uses them; never the states)
    noise: torch.Tensor  # [B, C, H, W] fresh noise for objectives that need one per sample
    cond_real: Cond  # the real latents' own captions (a teacher or student state carries its rollout's prompt)
    pairs: Optional[TeacherPairs] = None  # teacher noise-image pairs, for objectives with a regression loss
    # What the whole global batch was made of (not sliced): per-source counts [3], fresh student rollouts, and the
    # student states made by at least one student step (a rollout of j = 0 steps is pure noise)
    counts: Optional[torch.Tensor] = None
    fresh: int = 0
    student_induced: int = 0

    def slice(self, start: int, end: int) -> "StateBatch":
        """Samples [start, end): one rank's share of a global batch."""
        return StateBatch(self.x_t[start:end], self.k[start:end], self.t[start:end],
                          {key: v[start:end] for key, v in self.cond.items()}, self.source[start:end],
                          self.x0_real[start:end], self.noise[start:end],
                          {key: v[start:end] for key, v in self.cond_real.items()},
                          self.pairs.slice(start, end) if self.pairs is not None else None,
                          self.counts, self.fresh, self.student_induced)


@dataclass
class TrainingData:
    """What the mixture draws from: the latent cache and the teacher rollouts, as tensors."""

    latents: torch.Tensor  # [N, C, H, W]
    cond: Cond  # [N, ...]
    rollout_states: Optional[torch.Tensor] = None  # [R, K, C, H, W] teacher states at rollout_timesteps
    rollout_timesteps: Optional[torch.Tensor] = None  # [K]
    rollout_ref: Optional[torch.Tensor] = None  # [R] index of each rollout's prompt in `cond`
    rollout_x0: Optional[torch.Tensor] = None  # [R, C, H, W] the image each rollout ended at
