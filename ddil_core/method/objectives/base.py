"""The objective interface every base method implements (PD, LCM, DMD2, TDD).

An objective owns its trainable networks and frozen teacher, says which student grid it trains on, provides the
student's own no-grad step (for DDIL's student rollouts and for sampling), and turns a batch of DDIL states into
losses, one per optimiser. The training loop does the rest (optimisers, clipping, EMA, checkpoints).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from ddil_core.config import Config
from ddil_core.math.schedule import NoiseSchedule
from ddil_core.method.draws import SampleDraws
from ddil_core.method.grid import StudentGrid
from ddil_core.method.batch import SOURCES, StateBatch
from ddil_core.method.rollouts import Reflection, resolve_reflection
from ddil_core.models.conditioning import Cond


@dataclass
class ObjectiveContext:
    config: Config
    teacher_unet: torch.nn.Module  # frozen
    schedule: NoiseSchedule  # training schedule: final alpha 1, so the last student step returns its x0
    teacher_scheduler_config: dict  # to write the student's scheduler
    uncond: Cond  # batch-1 unconditional embedding for CFG
    reflection_bound: Optional[torch.Tensor] = None  # per-channel static bound from the latent cache
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    family: str = "sd15"  # the student pipeline's family: which reflections its saved scheduler can express
    latent_side: Optional[int] = None  # side of the training latents; None: the UNet's sample_size
    # float32 encodings by the teacher's pipeline (only for objectives that need them, TDD): the prompt "", and the
    # unconditional embedding the pipeline itself guides with ("" for SD 1.5, zeros for SDXL)
    empty_prompt: Optional[Cond] = None
    pipeline_uncond: Optional[Cond] = None

    def reflection(self, where: str) -> Reflection:
        """The reflection applied at `where` (teacher_targets, teacher_rollouts, student_rollouts, critic); one that
        acts counts what it clips (the train log's clip fraction)."""
        bounds = None if self.reflection_bound is None else self.reflection_bound.to(self.device)
        r = resolve_reflection(self.config.ddil.reflection, where, bounds, self.family)
        if r.mode == "off":
            return r
        return CountedReflection(**{f.name: getattr(r, f.name) for f in fields(Reflection)}, where=where)


@dataclass
class CountedReflection(Reflection):
    """A Reflection that counts the x0 elements it changes: those beyond the bound (static), every element of a
    sample it rescales (dynamic). The count stays on the device until `take_fraction` reads it."""

    where: str = ""
    changed: float | torch.Tensor = 0.0
    seen: int = 0

    def _count(self, x0: torch.Tensor, x0_r: torch.Tensor) -> torch.Tensor:
        self.changed = self.changed + (x0_r.detach() != x0.detach()).sum()
        self.seen += x0.numel()
        return x0_r

    def __call__(self, x_t, x0, eps, a, s):
        x0_r, eps_r = super().__call__(x_t, x0, eps, a, s)
        self._count(x0, x0_r)
        return x0_r, eps_r

    def threshold(self, x0: torch.Tensor) -> torch.Tensor:
        return self._count(x0, super().threshold(x0))

    def take_fraction(self) -> Optional[float]:
        """The share of x0 elements changed since the last call; None when none was seen."""
        if not self.seen:
            return None
        fraction = float(self.changed) / self.seen
        self.changed, self.seen = 0.0, 0
        return fraction


@dataclass
class LossOutput:
    losses: dict[str, torch.Tensor]  # optimiser name -> scalar loss to minimise this step
    per_sample: dict[str, torch.Tensor] = field(default_factory=dict)  # term -> [B] detached, for logging by source
    timings: dict[str, float] = field(default_factory=dict)  # seconds spent in teacher and student passes


class Objective:
    name = "base"
    pure_noise_first_step = False  # True: a forward state at the grid's first timestep is pure noise (mixture.py)
    needs_teacher_pairs = False  # True: every batch carries teacher noise-image pairs (mixture.TeacherPairs)

    def trainable(self) -> dict[str, torch.nn.Module]:
        """Networks with an optimiser each; 'student' is the one written as the student pipeline."""
        raise NotImplementedError

    def shardable(self) -> list[str]:
        """The trainable networks FSDP may shard (training.fsdp); the others are replicated, gradients averaged."""
        return list(self.trainable())

    def grid(self) -> StudentGrid:
        raise NotImplementedError

    @torch.no_grad()
    def student_step(self, x: torch.Tensor, k: int, cond: Cond, generator: torch.Generator) -> torch.Tensor:
        """One step k of the student's own sampler on its grid (stochastic samplers draw from `generator`)."""
        raise NotImplementedError

    def forward_timesteps(self) -> Optional[torch.Tensor]:
        """Where forward-diffused states are drawn; None: the student grid."""
        return None

    def loss(self, batch: StateBatch, step: int, draws: SampleDraws) -> LossOutput:
        """Losses on a batch of states; per-sample random numbers come from `draws` (the same on any number of
        processes)."""
        raise NotImplementedError

    def lr_for(self, name: str) -> float | None:
        """Learning rate of a trainable network's optimiser; None: training.lr."""
        return None

    def after_update(self, step: int) -> None:
        """Called after the optimiser steps of a training step (target networks, counters)."""

    def advance(self, step: int) -> bool:
        """Called before each step; True when a new stage starts (the loop then resets the optimisers)."""
        return False

    def total_steps(self) -> int:
        return self.config.training.steps

    def student_scheduler(self):
        raise NotImplementedError

    def student_info(self) -> dict:
        raise NotImplementedError

    def extra_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able state, tensors) beyond the trainable networks and optimisers, for checkpoints."""
        return {}, {}

    def load_extra_state(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def clip_fractions(self) -> dict[str, float]:
        """{where: share of x0 elements clipped} of each reflection that acted since the last call (its rollouts
        include the in-training watch's, which samples with the same step)."""
        reflections = [v for v in vars(self).values() if isinstance(v, CountedReflection)]
        return {r.where: f for r in reflections if (f := r.take_fraction()) is not None}


def student_scheduler_config(teacher_config: dict, reflection: Reflection, family: str, **sampler) -> dict:
    """The student's scheduler config: the teacher's noise schedule and prediction type, the student's sampler
    settings, and the reflection its rollouts used in training, so that plain diffusers loading the saved folder
    samples exactly as the student's own rollouts did (docs/method.md section 2)."""
    cfg = {k: v for k, v in teacher_config.items() if not k.startswith("_")}
    cfg.update(sampler)
    cfg.update(reflection.scheduler_kwargs(family))
    return cfg


def per_source_sums(values: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts of a [B] tensor for all samples and per DDIL source, [1 + len(SOURCES)] each, on the
    values' device: accumulated over a logging interval without a host sync per step."""
    sums = torch.zeros(1 + len(SOURCES), dtype=values.dtype, device=values.device)
    counts = torch.zeros_like(sums)
    sums[0], counts[0] = values.sum(), values.numel()
    sums[1:].index_add_(0, source, values)
    counts[1:].index_add_(0, source, torch.ones_like(values))
    return sums, counts


def interval_means(sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Sample-weighted means of an interval ("all" and each source present); a non-finite mean is left out."""
    out = {}
    for name, total, n in zip(("all", *SOURCES), sums.tolist(), counts.tolist()):
        if n > 0 and math.isfinite(total / n):
            out[name] = total / n
    return out
