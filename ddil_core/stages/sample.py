"""Stage sample: one image from a teacher or student pipeline with our own sampler (the math layer).

`--scheduler ddim` runs DDIM on the pipeline's scheduler config, reproducing diffusers' pipeline output for the same
prompt, seed, steps and guidance; `--scheduler student` runs the student's own scheduler as written by distill.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ddil_core.math.schedule import NoiseSchedule, ddim_prev_timestep, ddim_timesteps
from ddil_core.method.rollouts import ddim_sample
from ddil_core.models.conditioning import encode_prompts, encode_unconditional
from ddil_core.models.denoiser import Denoiser
from ddil_core.models.latents import decode_latents
from ddil_core.models.pipeline_io import load_pipeline, read_student_info

DEFAULT_GUIDANCE = 7.5  # diffusers' default for SD pipelines


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float,
             scheduler_config: Optional[dict] = None, resolution: Optional[int] = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] with deterministic DDIM, noise from a CPU generator per seed (as diffusers'
    randn_tensor with a CPU generator), classifier-free guidance when guidance_scale > 1 (as the pipelines)."""
    cfg = dict(scheduler_config or pipe.scheduler.config)
    schedule = NoiseSchedule.from_config(cfg)
    res = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    side = res // pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, side, side)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])
    T = schedule.num_train_timesteps
    timesteps = ddim_timesteps(T, steps, cfg.get("timestep_spacing", "leading"), cfg.get("steps_offset", 0))
    prev = ddim_prev_timestep(timesteps, T, steps)
    device = pipe.unet.device
    cond = encode_prompts(pipe, prompts, res)
    guided = guidance_scale > 1.0
    uncond = encode_unconditional(pipe, res) if guided else None
    latents = ddim_sample(Denoiser(pipe.unet, schedule), noise.to(device, pipe.unet.dtype), timesteps, prev, cond,
                          uncond, guidance_scale if guided else 1.0)
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
    if scheduler == "student" and type(pipe.scheduler).__name__ != "DDIMScheduler":
        raise ValueError(f"{model}: --scheduler student runs DDIM students; this one has {type(pipe.scheduler).__name__}")
    # Both read the folder's scheduler config: a teacher's (any scheduler class) is run as DDIM with its betas,
    # spacing and offsets, exactly as DDIMScheduler.from_config(pipe.scheduler.config) would.
    cfg = dict(pipe.scheduler.config)
    with torch.no_grad():
        image = generate(pipe, [prompt], [seed], steps, guidance_scale, cfg)[0]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    to_pil(image).save(tmp, format="PNG")
    tmp.replace(out)
    return out
