"""The sampler a student ships with, in one place: what `ddil sample`, evaluate, `ddil serve`, `ddil diagnose` and
the benchmarks all run.

A student folder is sampled with the diffusers scheduler it saved (diffusers' own `scheduler.step`, thresholding
included) at the recommended steps, guidance and eta of its ddil_student.json: exactly what
`DiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps=N, guidance_scale=W)` runs, and what the
student's own rollouts ran in training (tests/models/test_student_sampler.py, per objective and reflection). A folder
without ddil_student.json (a teacher) is sampled with deterministic DDIM on its scheduler config; "ddim" asks for
that on a student too.

- `generate`: whole images from noise, one CPU generator per seed (`student_images`: with the folder's defaults).
- `ShippedSampler.step(x, k)`: step k alone, for the covariate-shift measurement (method/teacher_reference.py has
  the teacher's version of each step). Stochastic schedulers (LCM, TCD) draw their noise for row i at step k from a
  generator seeded by (seed of row i, k), so the same row gets the same noise at step k wherever the step runs.
"""
from __future__ import annotations

import inspect
import io
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ddil_core.math.guidance_embedding import guidance_scale_embedding
from ddil_core.math.schedule import NoiseSchedule
from ddil_core.models import placement
from ddil_core.models.conditioning import Cond, encode_prompts, encode_unconditional, index_cond
from ddil_core.models.denoiser import Denoiser
from ddil_core.models.latents import decode_latents
from ddil_core.models.pipeline_io import ModelError

DEFAULT_GUIDANCE = 7.5  # diffusers' default for SD pipelines
SCHEDULERS = ("auto", "student", "ddim")


def sampling_scheduler(pipe, kind: str = "own"):
    """A fresh scheduler to sample `pipe` with: "own", the folder's saved scheduler (a student's trained sampler);
    "ddim", DDIMScheduler on the folder's scheduler config (as `DDIMScheduler.from_config(pipe.scheduler.config)`)."""
    from diffusers import DDIMScheduler

    if kind == "ddim":
        return DDIMScheduler.from_config(pipe.scheduler.config)
    if kind == "own":
        return type(pipe.scheduler).from_config(pipe.scheduler.config)
    raise ValueError(f"unknown sampling scheduler '{kind}' (own or ddim)")


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float, scheduler="own",
             resolution: Optional[int] = None, *, height: Optional[int] = None, width: Optional[int] = None,
             negative_prompt: Optional[str] = None, eta: Optional[float] = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1], one CPU generator per seed, as a diffusers pipeline called with
    `generator=[torch.Generator().manual_seed(s) for s in seeds]`, `height`, `width` (each defaults to
    `resolution`, else the native side), `negative_prompt` and `eta`.

    `scheduler` (a diffusers scheduler, or "own" / "ddim" for sampling_scheduler) is stepped as the pipelines step it:
    its thresholding or clipping, its timesteps and its noise draws are diffusers' own. Classifier-free guidance in one
    batched pass when guidance_scale > 1; a UNet with guidance conditioning (LCM students) gets the scale as an
    embedding of w - 1 instead, as StableDiffusionPipeline does. `eta` is passed to a step that takes it, as the
    pipelines pass their `eta` (DDIM's eta; TCD's gamma, which a TDD student's ddil_student.json gives).
    """
    scheduler = sampling_scheduler(pipe, scheduler) if isinstance(scheduler, str) else scheduler
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    size = (height or resolution or native, width or resolution or native)  # (height, width), as diffusers orders
    latent = (size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    noise = torch.stack([torch.randn((pipe.unet.config.in_channels, *latent), generator=g) for g in generators])
    device, dtype = placement(pipe.unet)
    cond = encode_prompts(pipe, prompts, size)
    w_dim = pipe.unet.config.time_cond_proj_dim
    timestep_cond = None
    if w_dim is not None:
        timestep_cond = guidance_scale_embedding(torch.full((len(prompts),), guidance_scale - 1.0), w_dim).to(device,
                                                                                                                dtype)
    guided = guidance_scale > 1.0 and w_dim is None
    uncond = encode_unconditional(pipe, size, negative_prompt) if guided else None
    denoiser = Denoiser(pipe.unet, NoiseSchedule.from_config(dict(scheduler.config)))
    scheduler.set_timesteps(steps)
    accepts = set(inspect.signature(scheduler.step).parameters)
    # eta: 0.0 is what StableDiffusionPipeline passes to any scheduler that takes one (DDIM: deterministic); a
    # scheduler without it (LCM) must not be given one
    if eta is not None and eta != 0.0 and "eta" not in accepts:
        raise ValueError(f"eta: {type(scheduler).__name__} takes no eta")
    step_kwargs = {k: v for k, v in (("eta", 0.0 if eta is None else float(eta)), ("generator", generators))
                   if k in accepts}
    x = noise.to(device, dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        out = denoiser.output(x_in, tt, cond, uncond, guidance_scale if guided else 1.0, timestep_cond)
        x = scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]
    return decode_latents(pipe.vae, x)


def student_sampling(pipe, info: Optional[dict], scheduler: str = "auto") -> tuple[str, Optional[list[int]]]:
    """("own" or "ddim", the trained timesteps to expect) for a folder: a student (it has ddil_student.json) samples
    with its own scheduler unless `scheduler` is "ddim"; a teacher with DDIM."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown --scheduler '{scheduler}' ({', '.join(SCHEDULERS)})")
    if scheduler == "ddim" or (info is None and scheduler == "auto"):
        return "ddim", None
    return "own", (info or {}).get("timesteps")


def student_eta(info: Optional[dict], kind: str = "own") -> Optional[float]:
    """The `eta` a student's own scheduler is stepped with: ddil_student.json's (a TDD student's TCD gamma; the
    pipelines pass 0.0 unless told); None (the pipeline's 0.0) for DDIM and for folders without one."""
    if kind != "own" or not info or info.get("eta") is None:
        return None
    return float(info["eta"])


def check_trained_grid(scheduler, steps: int, expected: Optional[list[int]], where: str) -> None:
    """The saved scheduler must sample the grid the student was trained on (a student written before the saved
    scheduler carried its grid would silently sample another one)."""
    if not expected or len(expected) != steps:
        return
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(steps)
    got = [int(t) for t in probe.timesteps.tolist()]
    if got != [int(t) for t in expected]:
        raise ModelError(f"{where}: its scheduler samples timesteps {got} at {steps} steps, but the student was "
                         f"trained on {list(expected)} (ddil_student.json); re-run distill to rewrite the folder")


def to_pil(image: torch.Tensor) -> Image.Image:
    arr = (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


DEFAULT_STEPS = 50  # `ddil sample` on a folder without ddil_student.json


def default_steps(info: Optional[dict]) -> int:
    return int(info["num_inference_steps"]) if info and info.get("num_inference_steps") else DEFAULT_STEPS


def default_guidance(info: Optional[dict]) -> float:
    return float(info["guidance_scale"]) if info and info.get("guidance_scale") is not None else DEFAULT_GUIDANCE


def check_shipped_sampler(pipe, info: Optional[dict], where: str) -> None:
    """What `ddil sample` refuses at the recommended steps (a saved scheduler off the trained grid), checked once at
    load by a server."""
    kind, trained = student_sampling(pipe, info)
    check_trained_grid(sampling_scheduler(pipe, kind), default_steps(info), trained, where)


def accepts_eta(pipe, info: Optional[dict]) -> bool:
    """Whether the scheduler the student samples with takes an eta (DDIM, TCD: yes; LCM: no)."""
    kind, _ = student_sampling(pipe, info)
    return "eta" in inspect.signature(sampling_scheduler(pipe, kind).step).parameters


def student_images(pipe, info: Optional[dict], prompts: list[str], seeds: list[int], steps: Optional[int] = None,
                   guidance_scale: Optional[float] = None, resolution: Optional[int] = None, *,
                   height: Optional[int] = None, width: Optional[int] = None, negative_prompt: Optional[str] = None,
                   eta: Optional[float] = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1], one CPU generator per seed (as `ddil sample`), `height` x `width` (each
    defaults to `resolution`, else the pipeline's native size). `info`: ddil_student.json, None for a folder
    without one; eta defaults to its "eta", else the pipeline's (0)."""
    steps = default_steps(info) if steps is None else int(steps)
    guidance_scale = default_guidance(info) if guidance_scale is None else float(guidance_scale)
    kind, _ = student_sampling(pipe, info)
    scheduler = sampling_scheduler(pipe, kind)  # a fresh one per batch: set_timesteps keeps state in it
    with torch.no_grad():
        return generate(pipe, list(prompts), list(seeds), steps, guidance_scale, scheduler, resolution=resolution,
                        height=height, width=width, negative_prompt=negative_prompt,
                        eta=student_eta(info, kind) if eta is None else eta)


def png_bytes(image: torch.Tensor) -> bytes:
    """One image [3, H, W] in [0, 1] as PNG, encoded as `ddil sample` writes its file."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- one step at a time
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
