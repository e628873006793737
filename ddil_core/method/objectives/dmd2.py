"""Distribution matching distillation, DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast
Image Synthesis"; code: tianweiy/DMD2 main/sd_guidance.py and main/sd_unified_model.py), with the generator's input
state drawn from the DDIL mixture (DMD2's own backward simulation is DDIL's student-backward source).

Networks: the frozen teacher (real score), a trainable fake score initialised from the teacher, the generator G
(the student, initialised from the teacher), and optionally a GAN classifier head on the fake score's bottleneck.
- Generator: x = G(x_t, t) on the grid [999, 749, 499, 249]; t' ~ U[min_step, max_step]; x_t' = noise(x, t');
  p_real = x - x0_real(x_t'; CFG w_real), p_fake = x - x0_fake(x_t');
  grad = (p_real - p_fake) / mean|p_real|;  L = 0.5 MSE(x, stopgrad(x - grad))   (sd_guidance.py, compute_distribution_matching_loss)
  so dL/dx = grad = x0_fake - x0_real: descent moves x from the fake score's x0 toward the real score's x0.
- Fake score: denoising loss on noise(x.detach(), t), t ~ U[0, T), no CFG.
- Two time-scale update: G is updated once every `dfake_gen_update_ratio` steps, the fake score every step.
- GAN (optional): G adds softplus(-D(fake)) x gan_gen_weight; the fake score adds
  (softplus(D(fake)) + softplus(-D(real))) x gan_disc_weight, D reading the fake UNet's mid-block features.
- Sampling (DMD2's multistep generator): x0 = G(x_t, t_k), re-noised with fresh noise to t_{k+1}; diffusers'
  LCMScheduler with the grid as custom timesteps does exactly this (c_skip ~ 0 at t >= 249).
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.nn import functional as F

from ddil_core.math.parameterization import to_x0_eps
from ddil_core.method.draws import SampleDraws
from ddil_core.method.grid import StudentGrid
from ddil_core.method.mixture import StateBatch
from ddil_core.method.objectives.base import LossOutput, Objective, ObjectiveContext
from ddil_core.models.denoiser import Denoiser


def distribution_matching_grad(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's normalised gradient (p_real - p_fake) / mean|p_real| per sample (sd_guidance.py)."""
    p_real = x - x0_real
    p_fake = x - x0_fake
    norm = p_real.abs().flatten(1).mean(1).clamp(min=1e-8).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.nan_to_num((p_real - p_fake) / norm)


def distribution_matching_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per sample 0.5 * mean (x - stopgrad(x - grad))^2; its gradient in x is grad / numel."""
    target = (x - grad).detach()
    return 0.5 * (x.float() - target.float()).pow(2).flatten(1).mean(1)


class BottleneckClassifier(nn.Module):
    """DMD2's GAN head: a small conv net on the fake score UNet's mid-block activations, one logit per sample."""

    def __init__(self, channels: int):
        super().__init__()
        groups = 32 if channels % 32 == 0 else 8
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).flatten(1).mean(1)


class FakeScore(nn.Module):
    """The trainable fake score UNet plus, optionally, the GAN head reading its bottleneck."""

    def __init__(self, unet, gan: bool):
        super().__init__()
        self.unet = unet
        self.head = BottleneckClassifier(unet.config.block_out_channels[-1]) if gan else None
        self._features = None
        if gan:
            unet.mid_block.register_forward_hook(lambda mod, inp, out: setattr(self, "_features", out))

    def logits(self, denoiser: Denoiser, x_t, t, cond) -> torch.Tensor:
        denoiser.output(x_t, t, cond)
        return self.head(self._features)


class DistributionMatchingDistillation(Objective):
    name = "dmd2"

    def __init__(self, ctx: ObjectiveContext):
        self.ctx, self.config, self.cfg = ctx, ctx.config, ctx.config.objective.dmd2
        self.T = ctx.schedule.num_train_timesteps
        self.real = Denoiser(ctx.teacher_unet, ctx.schedule)
        self.student = copy.deepcopy(ctx.teacher_unet).float().train().requires_grad_(True)
        self.fake = FakeScore(copy.deepcopy(ctx.teacher_unet).float().train().requires_grad_(True), self.cfg.gan)
        self.generator_denoiser = Denoiser(self.student, ctx.schedule)
        self.fake_denoiser = Denoiser(self.fake.unet, ctx.schedule)
        self._grid = StudentGrid.from_timesteps(self.cfg.timesteps)
        self.refl_critic = ctx.reflection("critic")
        self.refl_rollouts = ctx.reflection("student_rollouts")
        self.generator_updates = 0
        self.fake_updates = 0

    def trainable(self):
        return {"student": self.student, "fake": self.fake}

    def lr_for(self, name):
        return self.cfg.fake_lr if name == "fake" else None

    def grid(self) -> StudentGrid:
        return self._grid

    def x0(self, denoiser: Denoiser, x_t, t, cond, uncond=None, w: float = 1.0):
        out = denoiser.output(x_t, t, cond, uncond, w)
        a, s = self.ctx.schedule.alpha_sigma(t, like=x_t)
        return to_x0_eps(out, x_t, a, s, self.ctx.schedule.prediction_type)

    @torch.no_grad()
    def student_step(self, x, k: int, cond, generator=None):
        """DMD2 backward simulation: G's x0 at t_k, re-noised to t_{k+1} (clean after the last step)."""
        t = torch.full((x.shape[0],), self._grid.steps[k], device=x.device, dtype=torch.long)
        x0, eps = self.x0(self.generator_denoiser, x, t, cond)
        a, s = self.ctx.schedule.alpha_sigma(t, like=x)
        x0, _ = self.refl_rollouts(x, x0, eps, a, s)
        t_next = self._grid.next_steps[k]
        if t_next < 0:
            return x0
        noise = torch.randn(x.shape, generator=generator).to(x)
        return self.ctx.schedule.add_noise(x0, noise, torch.full_like(t, t_next))

    def is_generator_step(self, step: int) -> bool:
        return step % self.cfg.dfake_gen_update_ratio == 0

    def loss(self, batch: StateBatch, step: int, draws: SampleDraws) -> LossOutput:
        sched, cond = self.ctx.schedule, batch.cond
        losses, per_sample, timings = {}, {}, {"teacher": 0.0, "student": 0.0}
        gen_step = self.is_generator_step(step)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(gen_step):
            x, _ = self.x0(self.generator_denoiser, batch.x_t, batch.t, cond)
        timings["student"] += time.perf_counter() - t0

        if gen_step:
            t0 = time.perf_counter()
            t_dm = draws.randint(self.cfg.min_step, self.cfg.max_step + 1).to(x.device)
            noise = draws.randn(*x.shape[1:]).to(x)
            x_t = sched.add_noise(x.detach(), noise, t_dm)
            with torch.no_grad():
                a, s = sched.alpha_sigma(t_dm, like=x_t)
                x0_real, eps_real = self.x0(self.real, x_t, t_dm, cond, self.ctx.uncond, self.cfg.real_guidance_scale)
                x0_real, _ = self.refl_critic(x_t, x0_real, eps_real, a, s)
                x0_fake, eps_fake = self.x0(self.fake_denoiser, x_t, t_dm, cond)
                x0_fake, _ = self.refl_critic(x_t, x0_fake, eps_fake, a, s)
            dm = distribution_matching_loss(x, distribution_matching_grad(x.detach(), x0_real, x0_fake))
            per_sample["dm"] = dm.detach()
            gen_loss = dm.mean()
            if self.cfg.gan:
                x_gan = sched.add_noise(x, noise, t_dm)  # gradient flows through x into G
                gan_g = F.softplus(-self.fake.logits(self.fake_denoiser, x_gan, t_dm, cond))
                per_sample["gan_g"] = gan_g.detach()
                gen_loss = gen_loss + self.cfg.gan_gen_weight * gan_g.mean()
            losses["student"] = gen_loss
            timings["teacher"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        x_fake = x.detach()
        t_f = draws.randint(0, self.T).to(x.device)
        noise_f = draws.randn(*x.shape[1:]).to(x)
        x_t_f = sched.add_noise(x_fake, noise_f, t_f)
        out = self.fake_denoiser.output(x_t_f, t_f, cond)
        a, s = sched.alpha_sigma(t_f, like=x_t_f)
        x0_hat, eps_hat = to_x0_eps(out, x_t_f, a, s, sched.prediction_type)
        target = {"epsilon": noise_f, "sample": x_fake, "v_prediction": a * noise_f - s * x_fake}[sched.prediction_type]
        fake_loss = (out.float() - target.float()).pow(2).flatten(1).mean(1)
        per_sample["fake"] = fake_loss.detach()
        total_fake = fake_loss.mean()
        if self.cfg.gan:
            logits_fake = self.fake.logits(self.fake_denoiser, x_t_f, t_f, cond)
            x_t_real = sched.add_noise(batch.x0_real, noise_f, t_f)
            logits_real = self.fake.logits(self.fake_denoiser, x_t_real, t_f, cond)
            gan_d = F.softplus(logits_fake) + F.softplus(-logits_real)
            per_sample["gan_d"] = gan_d.detach()
            total_fake = total_fake + self.cfg.gan_disc_weight * gan_d.mean()
        losses["fake"] = total_fake
        timings["critic"] = time.perf_counter() - t0
        return LossOutput(losses, per_sample, timings)

    def after_update(self, step: int) -> None:
        self.fake_updates += 1
        self.generator_updates += int(self.is_generator_step(step))

    def student_scheduler(self):
        from diffusers import LCMScheduler

        cfg = {k: v for k, v in self.ctx.teacher_scheduler_config.items() if not k.startswith("_")}
        cfg.update(set_alpha_to_one=True, clip_sample=False, thresholding=False, timestep_spacing="leading",
                   steps_offset=1)  # unused by LCMScheduler; 1 keeps diffusers from warning
        return LCMScheduler.from_config(cfg)

    def student_info(self) -> dict:
        return {"objective": "dmd2", "num_inference_steps": self._grid.num_steps, "guidance_scale": 0.0,
                "scheduler": "LCMScheduler", "timesteps": list(self._grid.steps)}

    def extra_state(self):
        return {"generator_updates": self.generator_updates, "fake_updates": self.fake_updates}, {}

    def load_extra_state(self, state, tensors):
        self.generator_updates, self.fake_updates = state["generator_updates"], state["fake_updates"]
