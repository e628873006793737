"""The served images: what `ddil sample` computes, for a batch of prompts and seeds.

One function on top of ddil_core/stages/sample.py's `generate`, with the arguments `sample()` derives: the
student's recommended steps and guidance from its ddil_student.json when a request gives none, and the scheduler
`student_sampling` picks (a student's own saved scheduler, stepped as diffusers steps it; a folder without
ddil_student.json, a teacher, with DDIM). A served image therefore equals the PNG of
`ddil sample --model STUDENT --prompt P --seed S [--steps N] [--guidance W]` for the same arguments
(tests/test_serve.py checks it byte for byte).
"""
from __future__ import annotations

import io
from typing import Optional

import torch

from ddil_core.stages.sample import (DEFAULT_GUIDANCE, check_trained_grid, generate, sampling_scheduler,
                                     student_eta, student_sampling, to_pil)

DEFAULT_STEPS = 50  # `ddil sample` on a folder without ddil_student.json


def default_steps(info: Optional[dict]) -> int:
    return int(info["num_inference_steps"]) if info and info.get("num_inference_steps") else DEFAULT_STEPS


def default_guidance(info: Optional[dict]) -> float:
    return float(info["guidance_scale"]) if info and info.get("guidance_scale") is not None else DEFAULT_GUIDANCE


def check_student(pipe, info: Optional[dict], where: str) -> None:
    """What `ddil sample` refuses at the recommended steps (a saved scheduler off the trained grid), at load."""
    kind, trained = student_sampling(pipe, info)
    check_trained_grid(sampling_scheduler(pipe, kind), default_steps(info), trained, where)


def student_images(pipe, info: Optional[dict], prompts: list[str], seeds: list[int], steps: Optional[int] = None,
                   guidance_scale: Optional[float] = None, resolution: Optional[int] = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1], one CPU generator per seed (as `ddil sample`), square of side `resolution`
    (None: the pipeline's native size). `info`: ddil_student.json, None for a folder without one."""
    steps = default_steps(info) if steps is None else int(steps)
    guidance_scale = default_guidance(info) if guidance_scale is None else float(guidance_scale)
    kind, _ = student_sampling(pipe, info)
    scheduler = sampling_scheduler(pipe, kind)  # a fresh one per batch: set_timesteps keeps state in it
    with torch.no_grad():
        return generate(pipe, list(prompts), list(seeds), steps, guidance_scale, scheduler, resolution=resolution,
                        eta=student_eta(info, kind))


def png_bytes(image: torch.Tensor) -> bytes:
    """One image [3, H, W] in [0, 1] as PNG, encoded as `ddil sample` writes its file."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()
