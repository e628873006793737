"""The served images: what `ddil sample --scheduler student` computes, for a batch of prompts and seeds.

One function on top of ddil_core/stages/sample.py's `generate`, with the arguments `sample()` derives from the
student's ddil_student.json: its recommended steps and guidance when a request gives none, its own scheduler
(LCMScheduler students run multistep consistency sampling, DDIM students DDIM) on its scheduler config, and its
recorded timesteps when the steps are its recommended count. A served image therefore equals the PNG of
`ddil sample --model STUDENT --scheduler student --prompt P --seed S [--steps N] [--guidance W]` for the same
arguments (tests/test_serve.py checks it pixel for pixel).
"""
from __future__ import annotations

import io
from typing import Optional

import torch

from ddil_core.stages.sample import DEFAULT_GUIDANCE, generate, to_pil

DEFAULT_STEPS = 50  # `ddil sample` on a folder without ddil_student.json


def default_steps(info: Optional[dict]) -> int:
    return int(info["num_inference_steps"]) if info and info.get("num_inference_steps") else DEFAULT_STEPS


def default_guidance(info: Optional[dict]) -> float:
    return float(info["guidance_scale"]) if info and info.get("guidance_scale") is not None else DEFAULT_GUIDANCE


def student_images(pipe, info: Optional[dict], prompts: list[str], seeds: list[int], steps: Optional[int] = None,
                   guidance_scale: Optional[float] = None, resolution: Optional[int] = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1], one CPU generator per seed (as `ddil sample`), square of side `resolution`
    (None: the pipeline's native size)."""
    steps = default_steps(info) if steps is None else int(steps)
    guidance_scale = default_guidance(info) if guidance_scale is None else float(guidance_scale)
    timesteps = None
    if info and info.get("timesteps") and len(info["timesteps"]) == steps:
        timesteps = list(info["timesteps"])  # the student's own grid (LCM, DMD2), as `sample --scheduler student`
    with torch.no_grad():
        return generate(pipe, list(prompts), list(seeds), steps, guidance_scale, dict(pipe.scheduler.config),
                        resolution=resolution, timesteps=timesteps, sampler=None)


def png_bytes(image: torch.Tensor) -> bytes:
    """One image [3, H, W] in [0, 1] as PNG, encoded as `ddil sample` writes its file."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()
