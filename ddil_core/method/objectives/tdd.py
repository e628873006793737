"""Target-Driven Distillation (Wang et al. 2024, "Target-Driven Distillation: Consistency Distillation with Target
Timestep Selection and Decoupled Guidance", arXiv 2409.01347; code: RedAIGC/Target-Driven-Distillation
train/SDXL/train_tdd.py and train/SD15/train_tdd.py), with its online state drawn from the DDIL mixture.

- Teacher solver: one guided DDIM step t_{n+1} -> t_n = max(t_{n+1} - k, 0) on the grid of `num_ddim_timesteps`
  (250: skip k = 4), at a fixed CFG scale (4.5 Imagen form = the script's w = 3.5 in the LCM form).
- Target timestep s per sample (math/target_timesteps.py, the script's select_s): drawn from the 4..8-step schedules
  below t_n, then pulled down by up to s_ratio (0.3).
- No consistency boundary condition: the student's output is the DDIM jump to s with its own eps from x_{t_{n+1}},
  the target the same jump of the target network (the online student without gradient; ema_decay > 0: an EMA copy)
  from the teacher's x_{t_n} (tdd_step); pseudo-Huber, c = 0.001, on those latents at s.
- Decoupled guidance: no guidance embedding in the student; `caption_dropout` (0.2) of the captions become "" for the
  student, the teacher's conditional branch and the target (encode_prompt's proportion_empty_prompts). The teacher's
  unconditional branch is the pipeline's own: "" for SD 1.5, zeros for SDXL (as the scripts do). The student learns
  the guided and the unguided map and takes ordinary CFG (1.3-2) at inference.
- The shipped sampler is diffusers' TCDScheduler with original_inference_steps = num_ddim_timesteps: at t_k the
  student's x0 and eps jump to s = floor((1 - eta) t_{k+1}), then fresh noise takes it to t_{k+1} (TCD's gamma = eta;
  tdd_scheduler.py's step is the same but for its last step, which returns x0: models/tdd_scheduler.py). DDIL's
  student rollouts run exactly this step, with the recommended CFG and eta, so the student you train is the one
  `DiffusionPipeline.from_pretrained(folder)(..., guidance_scale=g, eta=eta)` samples.
- Our additions: v- and x0-prediction teachers (the script reads every output as eps), any T (the window 260 is
  T // min_inference_steps + 10).
"""
from __future__ import annotations

import time

import torch

from ddil_core.math.parameterization import to_x0_eps
from ddil_core.math.target_timesteps import (candidate_targets, ddim_jump, default_window, inference_schedule,
                                             solver_timesteps, target_timesteps)
from ddil_core.method.draws import SampleDraws
from ddil_core.method.grid import StudentGrid
from ddil_core.method.batch import StateBatch
from ddil_core.method.objectives.base import LossOutput, Objective, ObjectiveContext, student_scheduler_config
from ddil_core.method.objectives.lcm import consistency_distance
from ddil_core.models.conditioning import Cond
from ddil_core.models.denoiser import Denoiser
from ddil_core.models.trainable import TargetNetwork, trainable_copy


def drop_captions(cond: Cond, empty: Cond, drop: torch.Tensor) -> Cond:
    """Per sample, the embedding of "" (batch 1) where `drop` is True, else the caption's own."""
    out = {}
    for key, value in cond.items():
        mask = drop.to(value.device).reshape((-1,) + (1,) * (value.ndim - 1))
        out[key] = torch.where(mask, empty[key].to(value), value)
    return out


def tcd_step(x0: torch.Tensor, eps: torch.Tensor, abar_s: torch.Tensor, abar_next: torch.Tensor, eta: float,
             last: bool, noise_fn) -> torch.Tensor:
    """diffusers TCDScheduler.step after its x0/eps: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps, then (eta > 0, not
    the last step) x_next = sqrt(abar_next / abar_s) x_s + sqrt(1 - abar_next / abar_s) z."""
    x_s = ddim_jump(x0, eps, abar_s.sqrt(), (1 - abar_s).sqrt())
    if eta <= 0 or last:
        return x_s
    ratio = abar_next / abar_s
    return ratio.sqrt() * x_s + (1 - ratio).sqrt() * noise_fn(x_s)


class TargetDrivenDistillation(Objective):
    name = "tdd"

    def __init__(self, ctx: ObjectiveContext):
        self.ctx, self.config, self.cfg = ctx, ctx.config, ctx.config.objective.tdd
        self.T = ctx.schedule.num_train_timesteps
        self.skip = self.T // self.cfg.num_ddim_timesteps
        self.solver_timesteps = solver_timesteps(self.T, self.cfg.num_ddim_timesteps)
        self.candidates = candidate_targets(self.solver_timesteps, self.cfg.min_inference_steps,
                                            self.cfg.max_inference_steps)
        self.window = self.cfg.target_window or default_window(self.T, self.cfg.min_inference_steps)
        self.teacher = Denoiser(ctx.teacher_unet, ctx.schedule)
        t = ctx.config.training
        self.student = trainable_copy(ctx.teacher_unet, t.lora, t.gradient_checkpointing)
        self.student_denoiser = Denoiser(self.student, ctx.schedule)
        # ema_decay 0: the online student under no_grad (the reference)
        self.tracking = TargetNetwork(self.student, self.cfg.ema_decay) if self.cfg.ema_decay > 0 else None
        self.target = self.tracking.module if self.tracking is not None else None
        self.target_denoiser = Denoiser(self.target, ctx.schedule) if self.target is not None else self.student_denoiser
        steps = inference_schedule(self.solver_timesteps, ctx.config.objective.student_steps)
        self._grid = StudentGrid.from_timesteps(steps.tolist())
        self.refl_targets = ctx.reflection("teacher_targets")
        self.refl_rollouts = ctx.reflection("student_rollouts")
        if self.refl_rollouts.mode != "off":  # config/checks.py refuses it first; a hand-built context here
            from ddil_core.config import ConfigError

            raise ConfigError("ddil.reflection.apply_to: a TDD student's rollouts cannot be reflected (TCDScheduler "
                              "never thresholds x0)")
        self.uncond = ctx.pipeline_uncond if ctx.pipeline_uncond is not None else ctx.uncond
        self.empty = ctx.empty_prompt
        if self.empty is None:
            if ctx.family != "sd15":  # SDXL's unconditional embedding is zeros, not the encoded ""
                raise ValueError("TDD on an SDXL teacher needs ObjectiveContext.empty_prompt (the encoded \"\")")
            self.empty = ctx.uncond

    def trainable(self):
        return {"student": self.student}

    def grid(self) -> StudentGrid:
        return self._grid

    def forward_timesteps(self):
        return self.solver_timesteps

    def _x0_eps(self, denoiser: Denoiser, x, t, cond, uncond=None, guidance: float = 1.0):
        out = denoiser.output(x, t, cond, uncond, guidance if guidance > 1.0 else 1.0)
        a, s = self.ctx.schedule.alpha_sigma(t, like=x)
        return to_x0_eps(out, x, a, s, self.ctx.schedule.prediction_type)

    def _jump(self, denoiser: Denoiser, x, t, s, cond):
        """The DDIM jump to s with the network's own x0 and eps at (x, t) (tdd_step)."""
        x0, eps = self._x0_eps(denoiser, x, t, cond)
        a_s, s_s = self.ctx.schedule.alpha_sigma(s, like=x)
        return ddim_jump(x0, eps, a_s, s_s)

    @torch.no_grad()
    def student_step(self, x, k: int, cond, generator=None):
        """TCDScheduler.step with the student's CFG output (guidance_scale `sampling_guidance`, the pipeline's own
        unconditional embedding) and gamma = eta."""
        steps = self._grid.steps
        last = k == len(steps) - 1
        t_next = 0 if last else steps[k + 1]  # TCD's prev_timestep is 0 after the last step
        s = int(torch.floor((1 - self.cfg.eta) * torch.tensor(t_next)))
        t = torch.full((x.shape[0],), steps[k], device=x.device, dtype=torch.long)
        x0, eps = self._x0_eps(self.student_denoiser, x, t, cond, self.uncond, self.cfg.sampling_guidance)
        table = self.ctx.schedule.alphas_cumprod
        return tcd_step(x0, eps, table[s].to(x), table[t_next].to(x), self.cfg.eta, last,
                        lambda like: torch.randn(like.shape, generator=generator).to(like))

    @torch.no_grad()
    def targets(self, x, t, s, cond):
        """The teacher's guided DDIM step t_{n+1} -> t_n, then the target network's jump from there to s."""
        t_n = (t - self.skip).clamp(min=0)
        x0, eps = self.teacher.x0_eps(x, t, cond, self.uncond, self.cfg.guidance_scale)
        a, sig = self.ctx.schedule.alpha_sigma(t, like=x)
        x0, eps = self.refl_targets(x, x0, eps, a, sig)
        a_n, s_n = self.ctx.schedule.alpha_sigma(t_n, like=x)
        return self._jump(self.target_denoiser, ddim_jump(x0, eps, a_n, s_n), t_n, s, cond)

    def select_targets(self, t: torch.Tensor, draws: SampleDraws) -> torch.Tensor:
        """s for each sample at t_{n+1} = t (from t_n = max(t - k, 0), as the script's select_s(timesteps))."""
        t_n = (t - self.skip).clamp(min=0)
        return target_timesteps(t_n, self.candidates, self.window, self.cfg.s_ratio, draws.rand(), draws.rand())

    def loss(self, batch: StateBatch, step: int, draws: SampleDraws) -> LossOutput:
        x, t = batch.x_t, batch.t
        cond = drop_captions(batch.cond, self.empty, draws.rand() < self.cfg.caption_dropout)
        s = self.select_targets(t, draws)
        t0 = time.perf_counter()
        target = self.targets(x, t, s, cond)
        t1 = time.perf_counter()
        pred = self._jump(self.student_denoiser, x, t, s, cond)
        per_sample = consistency_distance(pred, target, self.cfg.loss, self.cfg.huber_c)
        t2 = time.perf_counter()
        return LossOutput({"student": per_sample.mean()}, {"tdd": per_sample.detach()},
                          {"teacher": t1 - t0, "student": t2 - t1})

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        if self.tracking is not None:
            self.tracking.update()

    def student_scheduler(self):
        from diffusers import TCDScheduler

        return TCDScheduler.from_config(student_scheduler_config(
            self.ctx.teacher_scheduler_config, self.refl_rollouts, self.ctx.family,
            original_inference_steps=self.cfg.num_ddim_timesteps))

    def student_info(self) -> dict:
        return {"objective": "tdd", "num_inference_steps": self._grid.num_steps,
                "guidance_scale": self.cfg.sampling_guidance, "eta": self.cfg.eta, "scheduler": "TCDScheduler",
                "original_inference_steps": self.cfg.num_ddim_timesteps, "timesteps": list(self._grid.steps),
                "reflection": self.refl_rollouts.describe()}

    def extra_state(self):
        return {}, self.tracking.state_tensors() if self.tracking is not None else {}

    def load_extra_state(self, state, tensors):
        if self.tracking is not None:
            self.tracking.load(tensors, strict=False)
