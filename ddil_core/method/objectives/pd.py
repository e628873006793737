"""Progressive distillation (Salimans and Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models"; code: google-research/google-research diffusion_distillation/diffusion_distillation/dpm.py), on a
DDPM-discretised latent diffusion teacher, with guidance distilled in the first stage (Meng et al. 2023).

From a state x_t on the student's N-step grid the teacher takes two DDIM steps, t -> t' -> t'' (t'' is the
student's next timestep). The student's x0 target is the one whose single DDIM step t -> t'' lands on the teacher's
x_t'':  x_tgt = (x_t'' - (s_t''/s_t) x_t) / (a_t'' - (s_t''/s_t) a_t); at the last step (s_t'' = 0) x_tgt = x_t''.
Loss: w(t) ||x0_student - x_tgt||^2 with w = max(SNR_t, 1) ("truncated SNR", the reference's default).
After each stage the student becomes the teacher and N halves, until objective.student_steps.
"""
from __future__ import annotations

import copy
import time

import torch

from ddil_core.math.ddim import ddim_step
from ddil_core.math.parameterization import to_x0_eps
from ddil_core.method.draws import SampleDraws
from ddil_core.method.grid import StudentGrid
from ddil_core.method.batch import StateBatch
from ddil_core.method.objectives.base import LossOutput, Objective, ObjectiveContext, student_scheduler_config
from ddil_core.models.denoiser import Denoiser
from ddil_core.models.trainable import trainable_copy


def pd_target(x_t, x_t2, a_t, s_t, a_t2, s_t2):
    """The x0 that makes one DDIM step x_t -> t'' land on x_t2 (Salimans and Ho 2022, Algorithm 2)."""
    ratio = s_t2 / s_t
    return (x_t2 - ratio * x_t) / (a_t2 - ratio * a_t)


def snr_weight(snr: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "snr_trunc":
        return snr.clamp(min=1.0)
    if kind == "snr":
        return snr
    return torch.ones_like(snr)


def stage_steps(teacher_steps: int, student_steps: int) -> list[int]:
    """Student step counts of the successive stages: teacher_steps/2, /4, ... down to student_steps."""
    steps, n = [], teacher_steps // 2
    while n >= student_steps:
        steps.append(n)
        n //= 2
    return steps


class ProgressiveDistillation(Objective):
    name = "pd"

    def __init__(self, ctx: ObjectiveContext):
        self.ctx, self.config = ctx, ctx.config
        self.cfg = ctx.config.objective.pd
        self.stages = stage_steps(self.cfg.teacher_steps, ctx.config.objective.student_steps)
        self.steps_per_stage = self.cfg.steps_per_stage or max(1, ctx.config.training.steps // len(self.stages))
        self.stage = 0
        self.T = ctx.schedule.num_train_timesteps
        self.teacher = Denoiser(ctx.teacher_unet, ctx.schedule)
        self.teacher_guidance = ctx.config.objective.guidance_scale
        t = ctx.config.training
        self.student = trainable_copy(ctx.teacher_unet, t.lora, t.gradient_checkpointing)
        self.student_denoiser = Denoiser(self.student, ctx.schedule)
        self.refl_targets = ctx.reflection("teacher_targets")
        self.refl_rollouts = ctx.reflection("student_rollouts")

    def trainable(self):
        return {"student": self.student}

    def total_steps(self) -> int:
        return self.steps_per_stage * len(self.stages)

    def grid(self) -> StudentGrid:
        return StudentGrid.ddim_trailing(self.T, self.stages[self.stage])

    def stage_of(self, step: int) -> int:
        return min(step // self.steps_per_stage, len(self.stages) - 1)

    def advance(self, step: int) -> bool:
        changed = False
        while self.stage < self.stage_of(step):
            # Hand-off: the converged student becomes the (unguided) teacher of the next, halved stage.
            self.teacher = Denoiser(copy.deepcopy(self.student).eval().requires_grad_(False), self.ctx.schedule)
            self.teacher_guidance = 1.0
            self.stage += 1
            changed = True
        return changed

    @torch.no_grad()
    def student_step(self, x, k: int, cond, generator=None):
        grid = self.grid()
        t = torch.full((x.shape[0],), int(grid.timesteps[k]), device=x.device, dtype=torch.long)
        t_next = torch.full_like(t, int(grid.prev_timesteps[k]))
        x0, eps = self.student_denoiser.x0_eps(x, t, cond)
        x0 = self.refl_rollouts.threshold(x0)  # DDIMScheduler.step thresholds x0 and keeps the network's eps
        a2, s2 = self.ctx.schedule.alpha_sigma(t_next, like=x)
        return ddim_step(x0, eps, a2, s2)

    @torch.no_grad()
    def teacher_two_steps(self, x_t, t, cond):
        """Two guided teacher DDIM steps t -> t - T/(2N) -> t - T/N; returns x_t''."""
        n = self.grid().num_steps
        half, full = self.T // (2 * n), self.T // n
        sched, x = self.ctx.schedule, x_t
        for t_from, t_to in ((t, t - half), (t - half, t - full)):
            x0, eps = self.teacher.x0_eps(x, t_from, cond, self.ctx.uncond, self.teacher_guidance)
            a, s = sched.alpha_sigma(t_from, like=x)
            x0, eps = self.refl_targets(x, x0, eps, a, s)
            a2, s2 = sched.alpha_sigma(t_to, like=x)
            x = ddim_step(x0, eps, a2, s2)
        return x

    def targets(self, batch: StateBatch) -> torch.Tensor:
        n = self.grid().num_steps
        x_t2 = self.teacher_two_steps(batch.x_t, batch.t, batch.cond)
        a, s = self.ctx.schedule.alpha_sigma(batch.t, like=batch.x_t)
        a2, s2 = self.ctx.schedule.alpha_sigma(batch.t - self.T // n, like=batch.x_t)
        return pd_target(batch.x_t, x_t2, a, s, a2, s2)

    def loss(self, batch: StateBatch, step: int, draws: SampleDraws) -> LossOutput:
        t0 = time.perf_counter()
        x_tgt = self.targets(batch)
        t1 = time.perf_counter()
        out = self.student_denoiser.output(batch.x_t, batch.t, batch.cond)
        a, s = self.ctx.schedule.alpha_sigma(batch.t, like=batch.x_t)
        x0_student, _ = to_x0_eps(out, batch.x_t, a, s, self.ctx.schedule.prediction_type)
        weight = snr_weight(self.ctx.schedule.snr(batch.t), self.cfg.weighting).to(x0_student.dtype)
        per_sample = weight * (x0_student - x_tgt).pow(2).flatten(1).mean(1)
        t2 = time.perf_counter()
        return LossOutput({"student": per_sample.mean()}, {"pd": per_sample.detach()},
                          {"teacher": t1 - t0, "student": t2 - t1})

    def student_scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(student_scheduler_config(
            self.ctx.teacher_scheduler_config, self.refl_rollouts, self.ctx.family, timestep_spacing="trailing",
            set_alpha_to_one=True))

    def student_info(self) -> dict:
        return {"objective": "pd", "num_inference_steps": self.stages[-1], "guidance_scale": 1.0,
                "scheduler": "DDIMScheduler", "timestep_spacing": "trailing",
                "timesteps": list(StudentGrid.ddim_trailing(self.T, self.stages[-1]).steps),
                "reflection": self.refl_rollouts.describe()}

    def extra_state(self):
        tensors = {}
        if self.stage > 0:  # the current teacher is an earlier student, not the original
            tensors = {f"teacher.{k}": v for k, v in self.teacher.unet.state_dict().items()}
        return {"stage": self.stage, "teacher_guidance": self.teacher_guidance}, tensors

    def load_extra_state(self, state, tensors):
        self.stage, self.teacher_guidance = state["stage"], state["teacher_guidance"]
        if self.stage > 0:
            unet = copy.deepcopy(self.student).eval().requires_grad_(False)
            unet.load_state_dict({k[len("teacher."):]: v for k, v in tensors.items() if k.startswith("teacher.")})
            self.teacher = Denoiser(unet, self.ctx.schedule)
