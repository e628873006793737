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
  (softplus(D(fake)) + softplus(-D(real))) x gan_disc_weight, D = a strided conv head on the fake UNet's bottleneck,
  each call on its input diffused to its own t ~ U{0..T-1}; real samples are real latents with their own captions.
- Regression (optional, DMD v1): G adds regression_weight x ||G(x_t) - x0_teacher||^2 on pairs of a state of the
  teacher's own trajectory and the image it ended at (the precomputed teacher rollouts).
- The generator's input at its first grid step is pure noise (sd_unified_model.py), whatever the DDIL source.
- Sampling (DMD2's multistep generator): x0 = G(x_t, t_k), re-noised with fresh noise to t_{k+1}. The saved
  LCMScheduler does exactly this (c_skip ~ 1e-8 at t >= 249) on the trained grid from num_inference_steps alone.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ddil_core.math.parameterization import to_x0_eps
from ddil_core.method.draws import SampleDraws
from ddil_core.config import ConfigError
from ddil_core.method.grid import StudentGrid, lcm_original_steps_for, lcm_scheduler_timesteps
from ddil_core.method.batch import StateBatch
from ddil_core.method.objectives.base import LossOutput, Objective, ObjectiveContext, student_scheduler_config
from ddil_core.method.objectives.lcm import pseudo_huber
from ddil_core.models.denoiser import Denoiser
from ddil_core.models.trainable import trainable_copy


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
    """DMD2's GAN head (tianweiy/DMD2 main/sd_guidance.py, cls_pred_branch): 4x4 stride-2 convs with GroupNorm and
    SiLU halve the fake score UNet's bottleneck until it is at most 4x4 (SD 1.5: 8 -> 4; SDXL: 32 -> 4), a conv as
    large as the map takes it to 1x1 (DMD2: 4x4, stride 4), and a 1x1 conv gives one logit per sample."""

    def __init__(self, channels: int, side: int):
        super().__init__()
        groups = math.gcd(channels, 32)

        def block(kernel, stride, padding):
            return [nn.Conv2d(channels, channels, kernel, stride, padding), nn.GroupNorm(groups, channels), nn.SiLU()]

        layers = []
        while side > 4:
            layers += block(4, 2, 1)
            side //= 2
        layers += block(side, side, 0) + [nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).flatten(1).mean(1)  # [B]: the map is 1x1 for square latents


@contextlib.contextmanager
def frozen(module: nn.Module):
    """No gradient for the module's parameters inside the block (it still flows through to its inputs).

    Gradient checkpointing is off for its UNets inside the block: a checkpointed segment is recomputed in backward,
    after the parameters require grad again, and torch refuses a recomputation that saves other tensors than the
    forward did (DMD2 also toggles checkpointing around such calls, main/sd_unified_model.py)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    checkpointed = [m for m in module.modules() if getattr(m, "is_gradient_checkpointing", False)]
    for p, _ in flags:
        p.requires_grad_(False)
    for m in checkpointed:
        m.disable_gradient_checkpointing()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m in checkpointed:
            m.enable_gradient_checkpointing()


class _Bottleneck(Exception):
    """Carries the mid-block output out of a UNet forward that has no further use for the up blocks."""

    def __init__(self, features: torch.Tensor):
        super().__init__("bottleneck reached")
        self.features = features


class FakeScore(nn.Module):
    """The trainable fake score UNet plus, optionally, the GAN head reading its bottleneck."""

    def __init__(self, unet, gan: bool, latent_side: int):
        super().__init__()
        self.unet = unet
        self.head = None
        self._classifying = False
        if gan:
            side = latent_side // 2 ** (len(unet.config.block_out_channels) - 1)  # every down block but the last halves
            self.head = BottleneckClassifier(unet.config.block_out_channels[-1], side)
            unet.mid_block.register_forward_hook(self._stop_at_bottleneck)

    def _stop_at_bottleneck(self, module, inputs, output):
        if self._classifying:
            raise _Bottleneck(output)

    def logits(self, denoiser: Denoiser, x_t, t, cond) -> torch.Tensor:
        """D(x_t, t): the UNet's down blocks and mid block only, then the head (DMD2 classify_forward, which returns
        the bottleneck without running the up blocks)."""
        self._classifying = True
        try:
            denoiser.output(x_t, t, cond)
            raise RuntimeError("the fake score UNet never reached its mid block")
        except _Bottleneck as stop:
            features = stop.features
        finally:
            self._classifying = False
        return self.head(features)


def dmd2_grid(timesteps: Optional[list[int]], student_steps: int, num_train_timesteps: int) -> tuple[int, StudentGrid]:
    """(original_inference_steps, grid) of the multistep generator: the given timesteps, or by default DMD2's
    range(T - 1, 0, -(T // N)) (sd_unified_model.py: [999, 749, 499, 249] for 4 steps), which is what LCMScheduler
    samples with original_inference_steps = T. Either way the saved LCMScheduler reproduces the grid from
    num_inference_steps alone."""
    if timesteps is None:
        return num_train_timesteps, StudentGrid.lcm(num_train_timesteps, student_steps, num_train_timesteps)
    original = lcm_original_steps_for(list(timesteps), num_train_timesteps)
    if original is None:
        raise ConfigError(
            f"objective.dmd2.timesteps = {list(timesteps)} is not a grid diffusers' LCMScheduler samples for "
            f"num_inference_steps = {len(timesteps)} (for any original_inference_steps), so the saved student could "
            f"not reproduce it; leave it null for {lcm_scheduler_timesteps(num_train_timesteps, len(timesteps), num_train_timesteps)}")
    return original, StudentGrid.from_timesteps(list(timesteps))


class DistributionMatchingDistillation(Objective):
    name = "dmd2"
    pure_noise_first_step = True  # DMD2 feeds pure noise at its first grid step (main/sd_unified_model.py)

    def __init__(self, ctx: ObjectiveContext):
        self.ctx, self.config, self.cfg = ctx, ctx.config, ctx.config.objective.dmd2
        self.T = ctx.schedule.num_train_timesteps
        self.real = Denoiser(ctx.teacher_unet, ctx.schedule)
        t = ctx.config.training
        self.student = trainable_copy(ctx.teacher_unet, t.lora, t.gradient_checkpointing)
        self.fake = FakeScore(trainable_copy(ctx.teacher_unet, self.cfg.fake_lora, t.gradient_checkpointing),
                              self.cfg.gan, ctx.latent_side or ctx.teacher_unet.config.sample_size)
        self.generator_denoiser = Denoiser(self.student, ctx.schedule)
        self.fake_denoiser = Denoiser(self.fake.unet, ctx.schedule)
        self.original_steps, self._grid = dmd2_grid(self.cfg.timesteps, ctx.config.objective.student_steps, self.T)
        self.refl_critic = ctx.reflection("critic")
        self.refl_rollouts = ctx.reflection("student_rollouts")
        self.generator_updates = 0
        self.fake_updates = 0

    def trainable(self):
        return {"student": self.student, "fake": self.fake}

    def shardable(self):
        # With the GAN the fake score stays whole under FSDP: the generator's GAN term runs through it with its
        # weights frozen (frozen() above), which FSDP2's gathered copies do not follow (their requires_grad is fixed
        # when first gathered), so its gradient would reach the sharded fake score (measured: 6% of its gradient).
        return ["student"] if self.cfg.gan else ["student", "fake"]

    def lr_for(self, name):
        return self.cfg.fake_lr if name == "fake" else self.cfg.generator_lr

    @property
    def needs_teacher_pairs(self) -> bool:
        return self.cfg.regression_weight > 0

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
        x0, _ = self.x0(self.generator_denoiser, x, t, cond)
        x0 = self.refl_rollouts.threshold(x0)  # as LCMScheduler.step thresholds x0
        t_next = self._grid.next_steps[k]
        if t_next < 0:
            return x0
        noise = torch.randn(x.shape, generator=generator).to(x)
        return self.ctx.schedule.add_noise(x0, noise, torch.full_like(t, t_next))

    def is_generator_step(self, step: int) -> bool:
        return step % self.cfg.dfake_gen_update_ratio == 0

    def regression(self, pairs) -> torch.Tensor:
        """DMD (v1)'s regression loss, per sample: G at a state of the teacher's own deterministic trajectory against
        the image that trajectory ended at (tianweiy/DMD2 main/train_sd_ode.py; in latent space, see the config)."""
        if pairs is None:
            raise ValueError("objective.dmd2.regression_weight > 0 needs teacher pairs in the batch")
        x, _ = self.x0(self.generator_denoiser, pairs.x_t, pairs.t, pairs.cond)
        if self.cfg.regression_loss == "huber":
            return pseudo_huber(x, pairs.x0, 1e-3)
        return (x.float() - pairs.x0.float()).pow(2).flatten(1).mean(1)

    def gan_logits(self, x0: torch.Tensor, cond, draws: SampleDraws) -> torch.Tensor:
        """D on x0 diffused to a timestep and noise of its own (DMD2 compute_cls_logits, --diffusion_gan: every call
        draws t ~ U{0..T-1} and fresh noise; real, fake and the generator's term are three separate calls)."""
        t = draws.randint(0, self.T).to(x0.device)
        noise = draws.randn(*x0.shape[1:]).to(x0)
        return self.fake.logits(self.fake_denoiser, self.ctx.schedule.add_noise(x0, noise, t), t, cond)

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
            if self.cfg.gan:  # gradient flows through D's input into G only (DMD2 freezes the guidance model here)
                with frozen(self.fake):
                    gan_g = F.softplus(-self.gan_logits(x, cond, draws))
                per_sample["gan_g"] = gan_g.detach()
                gen_loss = gen_loss + self.cfg.gan_gen_weight * gan_g.mean()
            if self.cfg.regression_weight > 0:
                reg = self.regression(batch.pairs)
                per_sample["regression"] = reg.detach()
                gen_loss = gen_loss + self.cfg.regression_weight * reg.mean()
            losses["student"] = gen_loss
            timings["teacher"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        x_fake = x.detach()
        t_f = draws.randint(0, self.T).to(x.device)
        noise_f = draws.randn(*x.shape[1:]).to(x)
        x_t_f = sched.add_noise(x_fake, noise_f, t_f)
        out = self.fake_denoiser.output(x_t_f, t_f, cond)
        a, s = sched.alpha_sigma(t_f, like=x_t_f)
        target = {"epsilon": noise_f, "sample": x_fake, "v_prediction": a * noise_f - s * x_fake}[sched.prediction_type]
        fake_loss = (out.float() - target.float()).pow(2).flatten(1).mean(1)
        per_sample["fake"] = fake_loss.detach()
        total_fake = fake_loss.mean()
        if self.cfg.gan:
            # Real samples are real latents with their own captions (DMD2 sd_guidance.py: real_train_dict's own
            # text embeddings); fake ones carry the prompts the generator was given. The two sets are unpaired.
            gan_d = F.softplus(self.gan_logits(x_fake, cond, draws)) + \
                F.softplus(-self.gan_logits(batch.x0_real, batch.cond_real, draws))
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

        # original_inference_steps makes num_inference_steps = N alone give the trained grid; steps_offset 1 is
        # unused by LCMScheduler and keeps StableDiffusionPipeline from rewriting the config on load.
        return LCMScheduler.from_config(student_scheduler_config(
            self.ctx.teacher_scheduler_config, self.refl_rollouts, self.ctx.family,
            original_inference_steps=self.original_steps, set_alpha_to_one=True, timestep_spacing="leading",
            steps_offset=1))

    def student_info(self) -> dict:
        return {"objective": "dmd2", "num_inference_steps": self._grid.num_steps, "guidance_scale": 0.0,
                "scheduler": "LCMScheduler", "timesteps": list(self._grid.steps),
                "reflection": self.refl_rollouts.describe()}

    def extra_state(self):
        return {"generator_updates": self.generator_updates, "fake_updates": self.fake_updates}, {}

    def load_extra_state(self, state, tensors):
        self.generator_updates, self.fake_updates = state["generator_updates"], state["fake_updates"]
