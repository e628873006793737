"""Stage sample: images from a teacher or student pipeline, stepped by the diffusers scheduler the folder ships.

One sampler for a student everywhere: `ddil sample`, evaluate and the benchmarks step the scheduler saved in the
student's folder (diffusers' own `scheduler.step`, thresholding included), with the recommended steps and guidance
of its ddil_student.json, which is exactly what `DiffusionPipeline.from_pretrained(folder)(prompt,
num_inference_steps=N, guidance_scale=W)` runs, and what the student's own rollouts ran in training (tested per
objective and reflection). A folder without ddil_student.json (a teacher) is sampled with deterministic DDIM on its
scheduler config; `--scheduler ddim` asks for that on a student too.
"""
from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ddil_core.math.guidance_embedding import guidance_scale_embedding
from ddil_core.models import placement
from ddil_core.models.conditioning import encode_prompts, encode_unconditional
from ddil_core.models.denoiser import Denoiser
from ddil_core.models.latents import decode_latents
from ddil_core.models.pipeline_io import ModelError, load_pipeline, read_student_info
from ddil_core.math.schedule import NoiseSchedule

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


def sample(model: str, prompt: str, steps: Optional[int], seed: int, out: str | Path,
           guidance_scale: Optional[float] = None, scheduler: str = "auto", allow_pickle: bool = False,
           width: Optional[int] = None, height: Optional[int] = None, negative_prompt: Optional[str] = None,
           eta: Optional[float] = None) -> Path:
    if steps is not None and steps < 1:
        raise ValueError(f"--steps {steps} must be at least 1")
    for flag, side in (("--width", width), ("--height", height)):
        if side is not None and (side < 8 or side % 8):
            raise ValueError(f"{flag} {side} must be a positive multiple of 8")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise ValueError(f"--guidance {guidance_scale} must be a finite number")
    pipe = load_pipeline(model, allow_pickle=allow_pickle)
    info = read_student_info(Path(model)) if Path(model).is_dir() else None
    if steps is None:
        steps = info["num_inference_steps"] if info else 50
    if guidance_scale is None:
        guidance_scale = info["guidance_scale"] if info else DEFAULT_GUIDANCE
    kind, trained = student_sampling(pipe, info, scheduler)
    sched = sampling_scheduler(pipe, kind)
    check_trained_grid(sched, steps, trained, model)
    eta = student_eta(info, kind) if eta is None else eta
    with torch.no_grad():
        image = generate(pipe, [prompt], [seed], steps, guidance_scale, sched, height=height, width=width,
                         negative_prompt=negative_prompt, eta=eta)[0]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        to_pil(image).save(tmp, format="PNG")
        tmp.replace(out)
    except BaseException:  # a full disk, a folder in the way: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise
    return out
