"""Reverse-process rollouts: the teacher's DDIM sampler and the student's own few-step sampler, both with optional
reflection of x0 (docs/method.md section 2). Batched over samples; the prefix of a student rollout runs without
gradient (code: DMD2 backward simulation, tianweiy/DMD2 main/sd_unified_model.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ddil_core.math.ddim import ddim_step
from ddil_core.math.reflection import reflect, threshold_x0
from ddil_core.models.conditioning import Cond
from ddil_core.models.denoiser import Denoiser


@dataclass
class Reflection:
    """Where and how x0 estimates are thresholded (math/reflection.py); `bound` is a float or, on the teacher's
    side only, a per-channel tensor."""

    mode: str = "off"
    bound: Optional[torch.Tensor | float] = None
    percentile: float = 0.995
    max_value: float = 1.0

    def __call__(self, x_t, x0, eps, a, s):
        """Teacher side: threshold x0 and recompute eps from it (docs/method.md section 2)."""
        if self.mode == "off":
            return x0, eps
        return reflect(x_t, x0, a, s, self.mode, self.bound, self.percentile, self.max_value)

    def threshold(self, x0: torch.Tensor) -> torch.Tensor:
        """Student side: threshold x0 only, as the saved scheduler's step does."""
        return threshold_x0(x0, self.mode, self.bound, self.percentile, self.max_value)

    def scheduler_kwargs(self, family: str) -> dict:
        """The DDIMScheduler/LCMScheduler config that applies this reflection in plain diffusers.

        Static: `clip_sample` + `clip_sample_range` in SDXL-family pipelines. StableDiffusionPipeline (SD 1.5
        family) resets `clip_sample` to False when it loads a scheduler (diffusers pipeline_stable_diffusion.py,
        the "clip_sample not set" deprecation), so there a static bound is written as `thresholding` with
        `sample_max_value` 1, which is exactly a clamp to [-1, 1], and any other bound cannot be expressed.
        Dynamic: `thresholding` + `dynamic_thresholding_ratio` + `sample_max_value` in both families."""
        if self.mode == "off":
            return {"clip_sample": False, "thresholding": False}
        if self.mode == "static":
            if isinstance(self.bound, torch.Tensor) and self.bound.numel() > 1:
                raise ValueError("per-channel bounds cannot be written into a diffusers scheduler (one scalar range)")
            bound = float(self.bound)
            if family == "sdxl":
                return {"clip_sample": True, "clip_sample_range": bound, "thresholding": False}
            if bound != 1.0:
                raise ValueError(f"a static bound of {bound:g} cannot be written into an SD 1.5-family scheduler")
            return {"clip_sample": False, "thresholding": True, "dynamic_thresholding_ratio": 1.0,
                    "sample_max_value": 1.0}
        return {"clip_sample": False, "thresholding": True, "dynamic_thresholding_ratio": float(self.percentile),
                "sample_max_value": float(self.max_value)}

    def describe(self) -> dict:
        """JSON-able record of this reflection (the student's ddil_student.json)."""
        bound = self.bound.tolist() if isinstance(self.bound, torch.Tensor) else self.bound
        return {"mode": self.mode, **({"bound": bound} if self.mode == "static" else {}),
                **({"percentile": self.percentile, "max_value": self.max_value} if self.mode == "dynamic" else {})}


def resolve_reflection(config, where: str, cache_bounds: Optional[torch.Tensor], family: str = "sd15") -> "Reflection":
    """The reflection `config` (a ReflectionConfig) asks for at `where` (one of REFLECTION_TARGETS).

    Static: ddil.reflection.bound, else the latent cache's per-channel bounds. Dynamic: max_value None caps s at the
    largest per-channel bound of the cache (1 without one). Student rollouts must be sampled the same way by the
    shipped scheduler (docs/method.md section 2), which holds one scalar range: there a static reflection clips to
    `bound`, else to the largest per-channel bound, and a setting the student's pipeline family cannot express
    (Reflection.scheduler_kwargs) is refused with a ConfigError naming the keys.
    """
    from ddil_core.config import ConfigError

    if config.mode == "off" or where not in config.apply_to:
        return NO_REFLECTION
    largest = float(cache_bounds.max()) if cache_bounds is not None else None
    if config.mode == "static":
        bound = config.bound if config.bound is not None else cache_bounds
        if bound is None:
            raise ConfigError("ddil.reflection.mode = static needs ddil.reflection.bound or a latent cache with bounds")
        if where == "student_rollouts" and isinstance(bound, torch.Tensor):
            bound = largest
        reflection = Reflection("static", bound)
    else:
        max_value = config.max_value if config.max_value is not None else (largest or 1.0)
        reflection = Reflection("dynamic", None, config.percentile, max(1.0, max_value))
    if where == "student_rollouts":
        try:
            reflection.scheduler_kwargs(family)
        except ValueError as exc:
            raise ConfigError(
                f"ddil.reflection: {exc}, and the shipped student must sample as its rollouts did in training: on "
                "SD 1.5-family teachers use ddil.reflection.mode=dynamic or ddil.reflection.bound=1 for "
                "student_rollouts, or remove student_rollouts from ddil.reflection.apply_to") from None
    return reflection


NO_REFLECTION = Reflection()


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, prev_timesteps: torch.Tensor,
                cond: Cond, uncond: Optional[Cond] = None, guidance_scale: float = 1.0,
                reflection: Reflection = NO_REFLECTION, record: Optional[Callable[[int, torch.Tensor], None]] = None,
                timestep_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deterministic DDIM from x at timesteps[0] through the grid; `record(i, x)` sees the input state of step i.
    Returns the final state (the clean sample when the last prev timestep is negative)."""
    schedule = denoiser.schedule
    for i, (t, t_prev) in enumerate(zip(timesteps.tolist(), prev_timesteps.tolist())):
        if record is not None:
            record(i, x)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps = denoiser.x0_eps(x, tt, cond, uncond, guidance_scale, timestep_cond)
        a, s = schedule.alpha_sigma(tt, like=x)
        x0, eps = reflection(x, x0, eps, a, s)
        a_prev, s_prev = schedule.alpha_sigma(torch.full_like(tt, t_prev), like=x)
        x = ddim_step(x0, eps, a_prev, s_prev)
    return x


@torch.no_grad()
def student_rollout(step_fn: Callable, noise: torch.Tensor, num_steps: int, cond: Cond) -> torch.Tensor:
    """Run the student's own sampler for `num_steps` of its grid from pure noise, without gradient:
    the state the student visits at inference before its step `num_steps` (DDIL's student-backward source).
    `step_fn(x, k, cond)` performs student step k."""
    x = noise
    for k in range(num_steps):
        x = step_fn(x, k, cond)
    return x


def teacher_interval_step(denoiser: Denoiser, total_steps: int, uncond: Optional[Cond], guidance_scale: float,
                          reflection: Reflection = NO_REFLECTION) -> Callable:
    """A step function `step(x, grid, k, cond)` taking the teacher over interval k of the student grid `grid`
    (t_k -> next t) with total_steps / grid.num_steps of its own guided DDIM steps: the teacher's part of DDIL's
    mixed teacher/student rollouts. The grid is passed per call, so a PD hand-off that halves the student's grid
    moves the teacher's intervals with it."""

    def step(x: torch.Tensor, grid, k: int, cond: Cond) -> torch.Tensor:
        substeps = max(1, total_steps // grid.num_steps)
        start, end = grid.steps[k], grid.next_steps[k]
        points = torch.linspace(start, max(end, 0), substeps + 1).round().long()
        ts, prev = points[:-1], points[1:].clone()
        if end < 0:
            prev[-1] = end  # the last interval ends at the clean sample
        return ddim_sample(denoiser, x, ts, prev, cond, uncond, guidance_scale, reflection)

    return step
