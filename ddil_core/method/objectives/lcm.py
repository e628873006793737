"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models"; code: diffusers
examples/consistency_distillation/train_lcm_distill_sd_wds.py), with its online state drawn from the DDIL mixture.

- DDIM solver on a grid of `num_ddim_timesteps` (50) over T (skip k = T / 50): from x at t_{n+k}, the teacher takes
  one guided DDIM step to t_n.
- Guidance w ~ U[w_min, w_max] (Imagen convention, the scale users pass as guidance_scale) is embedded, as w - 1
  the way StableDiffusionPipeline embeds it at inference, into the student's timestep_cond
  (guidance_scale_embedding); a teacher without time_cond_proj gets the layer added, zero-initialised. The script
  draws the LCM form w' = w - 1 ~ U[5, 15] and embeds w'; our default U[6, 16] gives the same targets.
- f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t, w); prediction f_student(x_{t_{n+k}}), target f_EMA(x_{t_n}) from
  an EMA copy of the student (decay 0.95); pseudo-Huber loss sqrt(d^2 + c^2) - c, c = 0.001 (or L2).
- The student samples with multistep consistency sampling (diffusers' LCMScheduler): at each of its timesteps it
  jumps to f(x, t), then re-noises to the next timestep with fresh noise.
- LoRA students (training.lora.rank > 0) are LCM-LoRA (diffusers train_lcm_distill_lora_sd_wds.py; Luo et al. 2023,
  "LCM-LoRA"): no guidance embedding (the teacher's CFG w ~ U[w_min, w_max] is distilled unconditionally), so the
  adapters load onto the teacher's own UNet (`pipe.load_lora_weights`), and the student samples without CFG
  (guidance_scale 1). The EMA target is kept (ours; the script uses the online student: set ema_decay 0 for that).
"""
from __future__ import annotations

import copy
import time

import torch

from ddil_core.math.consistency import consistency_function
from ddil_core.math.guidance_embedding import guidance_scale_embedding
from ddil_core.math.parameterization import to_x0_eps
from ddil_core.method.draws import SampleDraws
from ddil_core.method.grid import StudentGrid
from ddil_core.method.batch import StateBatch
from ddil_core.method.objectives.base import LossOutput, Objective, ObjectiveContext, student_scheduler_config
from ddil_core.models.denoiser import Denoiser
from ddil_core.models.trainable import TargetNetwork, trainable_copy


def add_guidance_conditioning(unet, time_cond_proj_dim: int):
    """A copy of `unet` that takes a guidance embedding as timestep_cond; a new projection starts at zero, so the
    copy computes exactly what the original does until it is trained."""
    from diffusers import UNet2DConditionModel

    if unet.config.time_cond_proj_dim is not None:
        return copy.deepcopy(unet)
    # without diffusers' "_use_default_values" (the keys a loaded config.json lacked, time_cond_proj_dim among them
    # for SD 1.5 and SDXL): from_config would reset those keys to their defaults, and no projection would be added
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = time_cond_proj_dim
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in m for m in missing):
        raise RuntimeError(f"could not add guidance conditioning: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(unet.device, unet.dtype)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Per sample: mean of sqrt((pred - target)^2 + c^2) - c."""
    return (torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c).flatten(1).mean(1)


def consistency_distance(pred: torch.Tensor, target: torch.Tensor, loss: str, huber_c: float) -> torch.Tensor:
    """Per sample: pseudo-Huber ("huber") or the mean squared error ("l2"), the two losses of LCM and TDD."""
    if loss == "huber":
        return pseudo_huber(pred, target, huber_c)
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


class LatentConsistencyDistillation(Objective):
    name = "lcm"

    def __init__(self, ctx: ObjectiveContext):
        self.ctx, self.config, self.cfg = ctx, ctx.config, ctx.config.objective.lcm
        self.T = ctx.schedule.num_train_timesteps
        self.skip = self.T // self.cfg.num_ddim_timesteps
        # The solver grid t = skip, 2 skip, ..., T, minus one (train_lcm_distill_sd_wds.py: DDIMSolver).
        self.solver_timesteps = torch.arange(1, self.cfg.num_ddim_timesteps + 1) * self.skip - 1
        self.teacher = Denoiser(ctx.teacher_unet, ctx.schedule)
        t = ctx.config.training
        self.embeds_guidance = not t.lora.rank  # LCM-LoRA: no time_cond_proj (it is no LoRA layer; see above)
        build = (lambda unet: add_guidance_conditioning(unet, self.cfg.time_cond_proj_dim)) if self.embeds_guidance \
            else None
        self.student = trainable_copy(ctx.teacher_unet, t.lora, t.gradient_checkpointing, build)
        self.tracking = TargetNetwork(self.student, self.cfg.ema_decay)  # the EMA target network
        self.target = self.tracking.module
        self.student_denoiser = Denoiser(self.student, ctx.schedule)
        self.target_denoiser = Denoiser(self.target, ctx.schedule)
        self._grid = StudentGrid.lcm(self.T, ctx.config.objective.student_steps, self.cfg.num_ddim_timesteps)
        self.refl_targets = ctx.reflection("teacher_targets")
        self.refl_rollouts = ctx.reflection("student_rollouts")
        self.sampling_guidance = (self.cfg.w_min + self.cfg.w_max) / 2 if self.embeds_guidance else 1.0

    def trainable(self):
        return {"student": self.student}

    def grid(self) -> StudentGrid:
        return self._grid

    def forward_timesteps(self):
        return self.solver_timesteps

    def w_embedding(self, w: torch.Tensor):
        if not self.embeds_guidance:
            return None
        return guidance_scale_embedding(w - 1.0, self.cfg.time_cond_proj_dim).to(self.ctx.device)

    def consistency(self, denoiser: Denoiser, x, t, cond, w_emb):
        out = denoiser.output(x, t, cond, timestep_cond=w_emb)
        a, s = self.ctx.schedule.alpha_sigma(t, like=x)
        x0, _ = to_x0_eps(out, x, a, s, self.ctx.schedule.prediction_type)
        return consistency_function(x, x0, t)

    @torch.no_grad()
    def student_step(self, x, k: int, cond, generator=None):
        """LCMScheduler.step: jump to f(x, t_k); re-noise to t_{k+1} with fresh noise unless it is the last step."""
        t = torch.full((x.shape[0],), self._grid.steps[k], device=x.device, dtype=torch.long)
        w = torch.full((x.shape[0],), self.sampling_guidance)
        out = self.student_denoiser.output(x, t, cond, timestep_cond=self.w_embedding(w))
        a, s = self.ctx.schedule.alpha_sigma(t, like=x)
        x0, _ = to_x0_eps(out, x, a, s, self.ctx.schedule.prediction_type)
        x0 = self.refl_rollouts.threshold(x0)  # LCMScheduler.step thresholds x0 before the boundary scalings
        denoised = consistency_function(x, x0, t)
        t_next = self._grid.next_steps[k]
        if t_next < 0:
            return denoised
        noise = torch.randn(x.shape, generator=generator).to(x)
        return self.ctx.schedule.add_noise(denoised, noise, torch.full_like(t, t_next))

    @torch.no_grad()
    def targets(self, x, t, cond, w, w_emb):
        """The teacher's guided DDIM solver step t_{n+k} -> t_n, then the EMA target's consistency output there."""
        sched = self.ctx.schedule
        t_prev = (t - self.skip).clamp(min=0)
        x0, eps = self.teacher.x0_eps(x, t, cond, self.ctx.uncond, w.to(x).reshape(-1, 1, 1, 1))
        a, s = sched.alpha_sigma(t, like=x)
        x0, eps = self.refl_targets(x, x0, eps, a, s)
        a_p, s_p = sched.alpha_sigma(t_prev, like=x)
        return self.consistency(self.target_denoiser, a_p * x0 + s_p * eps, t_prev, cond, w_emb)

    def loss(self, batch: StateBatch, step: int, draws: SampleDraws) -> LossOutput:
        x, t, cond = batch.x_t, batch.t, batch.cond
        w = self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * draws.rand()
        w_emb = self.w_embedding(w)
        t0 = time.perf_counter()
        target = self.targets(x, t, cond, w, w_emb)
        t1 = time.perf_counter()
        pred = self.consistency(self.student_denoiser, x, t, cond, w_emb)
        per_sample = consistency_distance(pred, target, self.cfg.loss, self.cfg.huber_c)
        t2 = time.perf_counter()
        return LossOutput({"student": per_sample.mean()}, {"lcm": per_sample.detach()},
                          {"teacher": t1 - t0, "student": t2 - t1})

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        """The target network tracks the student (EMA, decay 0.95 in the reference script)."""
        self.tracking.update()

    def student_scheduler(self):
        from diffusers import LCMScheduler

        return LCMScheduler.from_config(student_scheduler_config(
            self.ctx.teacher_scheduler_config, self.refl_rollouts, self.ctx.family,
            original_inference_steps=self.cfg.num_ddim_timesteps, timestep_spacing="leading", steps_offset=1,
            set_alpha_to_one=True))

    def student_info(self) -> dict:
        return {"objective": "lcm", "num_inference_steps": self._grid.num_steps,
                "guidance_scale": self.sampling_guidance, "scheduler": "LCMScheduler",
                "timesteps": list(self._grid.steps), "reflection": self.refl_rollouts.describe()}

    def extra_state(self):
        return {}, self.tracking.state_tensors()  # a LoRA target differs from the teacher in its adapters only

    def load_extra_state(self, state, tensors):
        self.tracking.load(tensors, strict=self.embeds_guidance)
