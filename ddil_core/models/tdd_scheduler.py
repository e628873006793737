"""TDDScheduler: the reference's exact sampler (RedAIGC/Target-Driven-Distillation tdd_scheduler.py) as a diffusers
scheduler of this package, for evaluation and for users who want it:

    from ddil_core.models.tdd_scheduler import TDDScheduler
    pipe = DiffusionPipeline.from_pretrained(folder, scheduler=TDDScheduler.from_pretrained(folder, subfolder="scheduler"))
    image = pipe(prompt, num_inference_steps=4, guidance_scale=1.7, eta=0.2).images[0]

A TDD student folder ships diffusers' TCDScheduler (models need no code of ours to load); this class reads that config
(no remote code). It is TCDScheduler's gamma sampler on the same timesteps (the reference's set_timesteps is TCD's rule
on its `tdd_train_step` grid, our original_inference_steps), with the reference's three differences:

- the last step returns x0 exactly (the reference's final sigma is zero); TCD lands on t = 0, sqrt(abar_0) x0 +
  sqrt(1 - abar_0) eps, so the two differ on the last step only;
- `clip_steps`: x0 clamped to [-clip_sample_range, clip_sample_range] on the first clip_steps steps, eps recomputed
  from it (the reference's `t_l + 1` steps of `_threshold_sample` with sample_max_value 1, which is a clamp to
  [-1, 1]; its first-order DPM-Solver++ update is DDIM with the eps of the clamped x0); off by default, as there;
- `non_equidistant`: the reference's `special_jump` tables on the 250-grid (a short first step, then the 4- or
  8-step schedule) for 5, 6 and 7 steps, e.g. [999, 875, 751, 499, 251].
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers import TCDScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_tcd import TCDSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers' loader looks for it here)
from diffusers.utils.torch_utils import randn_tensor

# tdd_scheduler.py set_timesteps, special_jump with tdd_train_step 250
NON_EQUIDISTANT = {5: [999, 875, 751, 499, 251], 6: [999, 875, 751, 627, 499, 251],
                   7: [999, 875, 751, 627, 499, 375, 251]}


class TDDScheduler(TCDScheduler):
    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas=None, original_inference_steps: int = 250,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                 steps_offset: int = 0, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", timestep_scaling: float = 10.0, rescale_betas_zero_snr: bool = False,
                 clip_steps: int = 0, non_equidistant: bool = False):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         original_inference_steps, clip_sample, clip_sample_range, set_alpha_to_one, steps_offset,
                         prediction_type, thresholding, dynamic_thresholding_ratio, sample_max_value,
                         timestep_spacing, timestep_scaling, rescale_betas_zero_snr)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, original_inference_steps=None,
                      timesteps: Optional[list[int]] = None, strength: float = 1.0) -> None:
        if (timesteps is None and self.config.non_equidistant and num_inference_steps in NON_EQUIDISTANT
                and self.config.original_inference_steps == 250 and self.config.num_train_timesteps == 1000):
            timesteps, num_inference_steps = NON_EQUIDISTANT[num_inference_steps], None
        super().set_timesteps(num_inference_steps, device, original_inference_steps, timesteps, strength)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.3,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self.step_index is None:
            self._init_step_index(timestep)
        if not 0 <= eta <= 1:
            raise ValueError(f"eta (gamma) = {eta} must be in [0, 1]")
        last = self.step_index == len(self.timesteps) - 1
        prev_t = 0 if last else int(self.timesteps[self.step_index + 1])
        s = int(torch.floor((1 - eta) * torch.tensor(prev_t)))  # as TCDScheduler.step rounds it
        abar = self.alphas_cumprod.to(sample.device)
        abar_t, abar_prev, abar_s = abar[int(timestep)], abar[prev_t], abar[s]
        x0, eps = self._x0_eps(model_output, sample, abar_t)
        if self.step_index < self.config.clip_steps:
            r = self.config.clip_sample_range
            x0 = x0.clamp(-r, r)
            eps = (sample - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
        if last:
            prev_sample = denoised = x0
        else:
            denoised = abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * eps
            prev_sample = denoised
            if eta > 0:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=denoised.dtype)
                ratio = abar_prev / abar_s
                prev_sample = ratio.sqrt() * denoised + (1 - ratio).sqrt() * noise
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return TCDSchedulerOutput(prev_sample=prev_sample, pred_noised_sample=denoised)

    def _x0_eps(self, out: torch.Tensor, x: torch.Tensor, abar_t: torch.Tensor):
        a, s = abar_t.sqrt(), (1 - abar_t).sqrt()
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (x - s * out) / a, out
        if kind == "sample":
            return out, (x - a * out) / s
        if kind == "v_prediction":
            return a * x - s * out, a * out + s * x
        raise ValueError(f"prediction_type {kind} must be epsilon, sample or v_prediction for TDDScheduler")
