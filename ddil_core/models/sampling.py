"""The sampler a pipeline folder ships, one step at a time, and the teacher's version of each of its steps.

`ShippedSampler.step(x, k)` is step k of the folder's own scheduler at `steps` steps, stepped as diffusers steps it
(its thresholding, its timesteps, its noise draws), with the network guided as the pipelines guide it: classifier-
free guidance in one batched pass, or a guidance embedding of w - 1 for a UNet with one (LCM students). Stochastic
schedulers (LCM, TCD) draw their noise for row i at step k from a generator seeded by (seed of row i, k), so the
same row gets the same noise at step k wherever the step is applied.
The teacher's version of each step (the covariate-shift measurement) is method/teacher_reference.py.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from ddil_core.math.guidance_embedding import guidance_scale_embedding
from ddil_core.math.schedule import NoiseSchedule
from ddil_core.models import placement
from ddil_core.models.conditioning import Cond, encode_prompts, encode_unconditional, index_cond
from ddil_core.models.denoiser import Denoiser

NOISE_SEED_STRIDE = 1_000_003  # seeds of row noises: seed * stride + k, distinct for every (row, step) in use


def noise_generators(seeds: list[int], k: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s) * NOISE_SEED_STRIDE + k) for s in seeds]


def is_interval_sampler(scheduler) -> bool:
    """DDIM moves a state from one grid timestep to the next deterministically (eta 0, as our samplers run it)."""
    from diffusers import DDIMScheduler

    return isinstance(scheduler, DDIMScheduler)


class ShippedSampler:
    """Step k of `scheduler` at `steps` steps on `pipe`, for rows with the given prompts and noise seeds."""

    def __init__(self, pipe, scheduler, steps: int, guidance_scale: float, prompts: list[str], seeds: list[int],
                 resolution: int):
        self.pipe, self.scheduler, self.steps = pipe, scheduler, int(steps)
        self.seeds = list(seeds)
        device, dtype = placement(pipe.unet)
        self.cond: Cond = encode_prompts(pipe, prompts, resolution)
        w_dim = pipe.unet.config.time_cond_proj_dim
        self.timestep_cond = None
        if w_dim is not None:  # guidance as an embedding of w - 1 (StableDiffusionPipeline's rule)
            self.timestep_cond = guidance_scale_embedding(torch.full((len(prompts),), guidance_scale - 1.0),
                                                          w_dim).to(device, dtype)
        guided = guidance_scale > 1.0 and w_dim is None
        self.guidance = guidance_scale if guided else 1.0
        self.uncond = encode_unconditional(pipe, resolution) if guided else None
        self.schedule = NoiseSchedule.from_config(dict(scheduler.config))
        self.denoiser = Denoiser(pipe.unet, self.schedule)
        first = self._fresh(0)
        self.timesteps = [int(t) for t in first.timesteps]
        self.init_noise_sigma = float(first.init_noise_sigma)

    def _fresh(self, k: int):
        sched = type(self.scheduler).from_config(self.scheduler.config)
        sched.set_timesteps(self.steps)
        if hasattr(sched, "set_begin_index"):  # stateful schedulers (LCM, TCD) step from their step index
            sched.set_begin_index(k)
        return sched

    def output(self, x: torch.Tensor, k: int, rows: torch.Tensor) -> torch.Tensor:
        """The guided network output at x, grid timestep k, for the given rows."""
        t = torch.full((x.shape[0],), self.timesteps[k], device=x.device, dtype=torch.long)
        tc = None if self.timestep_cond is None else self.timestep_cond[rows]
        return self.denoiser.output(x, t, index_cond(self.cond, rows), self.uncond, self.guidance, tc)

    def step(self, x: torch.Tensor, k: int, rows: torch.Tensor, model_output: Optional[torch.Tensor] = None):
        """Scheduler step k from x (with `model_output` in place of the network's, if given)."""
        sched = self._fresh(k)
        t = sched.timesteps[k]
        x_in = sched.scale_model_input(x, t)
        out = self.output(x_in, k, rows) if model_output is None else model_output
        accepts = set(inspect.signature(sched.step).parameters)
        kwargs = {}
        if "eta" in accepts:
            kwargs["eta"] = 0.0
        if "generator" in accepts:
            kwargs["generator"] = noise_generators([self.seeds[int(r)] for r in rows], k)
        return sched.step(out, t, x, **kwargs, return_dict=False)[0]
