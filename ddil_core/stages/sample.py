"""Stage sample: one image from a teacher or student pipeline with our own sampler (the math layer).

`--scheduler ddim` runs DDIM on the pipeline's scheduler config, reproducing diffusers' pipeline output for the same
prompt, seed, steps and guidance; `--scheduler student` runs the student's own scheduler as written by distill.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ddil_core.math.schedule import NoiseSchedule, ddim_prev_timestep, ddim_timesteps
from ddil_core.math.guidance_embedding import guidance_scale_embedding
from ddil_core.method.rollouts import consistency_sample, ddim_sample
from ddil_core.models import placement
from ddil_core.models.conditioning import encode_prompts, encode_unconditional
from ddil_core.models.denoiser import Denoiser
from ddil_core.models.latents import decode_latents
from ddil_core.models.pipeline_io import load_pipeline, read_student_info

DEFAULT_GUIDANCE = 7.5  # diffusers' default for SD pipelines


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float,
             scheduler_config: Optional[dict] = None, resolution: Optional[int] = None,
             timesteps: Optional[list[int]] = None, sampler: Optional[str] = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1], one CPU generator per seed (as diffusers' pipelines with a CPU generator).

    DDIM-family schedulers run deterministic DDIM with classifier-free guidance when guidance_scale > 1.
    An LCMScheduler (LCM and DMD2 students) runs multistep consistency sampling; a UNet with guidance
    conditioning (LCM) gets the scale as an embedding of w - 1 instead of CFG, as StableDiffusionPipeline does.
    `sampler` ("ddim" or "consistency") defaults to the pipeline's own scheduler class.
    """
    if sampler is None:
        sampler = "consistency" if type(pipe.scheduler).__name__ == "LCMScheduler" else "ddim"
    cfg = dict(scheduler_config or pipe.scheduler.config)
    schedule = NoiseSchedule.from_config(cfg)
    res = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    side = res // pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, side, side)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    device, dtype = placement(pipe.unet)
    x = noise.to(device, dtype)
    cond = encode_prompts(pipe, prompts, res)
    denoiser = Denoiser(pipe.unet, schedule)
    w_dim = pipe.unet.config.time_cond_proj_dim
    timestep_cond = None
    if w_dim is not None:
        w = torch.full((len(prompts),), guidance_scale - 1.0)
        timestep_cond = guidance_scale_embedding(w, w_dim).to(device, dtype)
    guided = guidance_scale > 1.0 and w_dim is None
    uncond = encode_unconditional(pipe, res) if guided else None
    w = guidance_scale if guided else 1.0
    if sampler == "consistency":
        from diffusers import LCMScheduler

        scheduler = LCMScheduler.from_config(cfg)
        scheduler.set_timesteps(num_inference_steps=None if timesteps else steps, timesteps=timesteps)
        latents = consistency_sample(denoiser, x, scheduler.timesteps.tolist(), cond, generators, uncond, w,
                                     timestep_cond)
    else:
        T = schedule.num_train_timesteps
        ts = ddim_timesteps(T, steps, cfg.get("timestep_spacing", "leading"), cfg.get("steps_offset", 0))
        latents = ddim_sample(denoiser, x, ts, ddim_prev_timestep(ts, T, steps), cond, uncond, w,
                              timestep_cond=timestep_cond)
    return decode_latents(pipe.vae, latents)


def to_pil(image: torch.Tensor) -> Image.Image:
    arr = (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def sample(model: str, prompt: str, steps: Optional[int], seed: int, out: str | Path,
           guidance_scale: Optional[float] = None, scheduler: str = "ddim", allow_pickle: bool = False) -> Path:
    pipe = load_pipeline(model, allow_pickle=allow_pickle)
    info = read_student_info(Path(model)) if Path(model).is_dir() else None
    if steps is None:
        steps = info["num_inference_steps"] if info else 50
    if guidance_scale is None:
        guidance_scale = info["guidance_scale"] if info else DEFAULT_GUIDANCE
    if scheduler not in ("ddim", "student"):
        raise ValueError(f"unknown --scheduler '{scheduler}' (ddim or student)")
    # ddim: the folder's scheduler config (any class) run as DDIM with its betas, spacing and offsets, exactly as
    # DDIMScheduler.from_config(pipe.scheduler.config) would; student: the scheduler distill wrote (DDIM or LCM).
    cfg = dict(pipe.scheduler.config)
    timesteps = None
    if scheduler == "student" and info and info.get("timesteps") and len(info["timesteps"]) == steps:
        timesteps = info["timesteps"]
    with torch.no_grad():
        image = generate(pipe, [prompt], [seed], steps, guidance_scale, cfg, timesteps=timesteps,
                         sampler=None if scheduler == "student" else "ddim")[0]
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
