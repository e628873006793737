"""The denoiser: a UNet, its noise schedule and prediction type, and classifier-free guidance in one batched pass.

`Denoiser.x0_eps(x_t, t, cond, uncond, w)` is the single entry point every rollout, objective and sampler uses.
"""
from __future__ import annotations

from typing import Optional

import torch

from ddil_core.math.parameterization import classifier_free_guidance, to_x0_eps
from ddil_core.math.schedule import NoiseSchedule
from ddil_core.models.conditioning import Cond, cat_cond, expand_cond, unet_kwargs


class Denoiser:
    def __init__(self, unet, schedule: NoiseSchedule):
        self.unet, self.schedule = unet, schedule

    def output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Optional[Cond] = None,
               guidance_scale: float = 1.0, timestep_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The raw network output (prediction_type), guided when guidance_scale != 1 (uncond given)."""
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0]) if torch.as_tensor(t).ndim == 0 else t
        unguided = isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0
        if unguided or uncond is None:
            return self.unet(x_t, t, timestep_cond=timestep_cond, **unet_kwargs(cond)).sample
        n = x_t.shape[0]
        both = cat_cond([expand_cond(uncond, n) if uncond[next(iter(uncond))].shape[0] == 1 else uncond, cond])
        tc = None if timestep_cond is None else torch.cat([timestep_cond, timestep_cond])
        out = self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), timestep_cond=tc, **unet_kwargs(both)).sample
        out_u, out_c = out.chunk(2)
        return classifier_free_guidance(out_u, out_c, guidance_scale)

    def x0_eps(self, x_t, t, cond, uncond=None, guidance_scale: float = 1.0, timestep_cond=None):
        """(x0, eps) estimates at x_t. Guidance is applied to the raw output, as diffusers pipelines do."""
        out = self.output(x_t, t, cond, uncond, guidance_scale, timestep_cond)
        a, s = self.schedule.alpha_sigma(t, like=x_t)
        return to_x0_eps(out, x_t, a, s, self.schedule.prediction_type)
