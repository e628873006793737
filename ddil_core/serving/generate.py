"""The served images: what `ddil sample` computes, for a batch of prompts and seeds.

One function on top of ddil_core/stages/sample.py's `generate`, with the arguments `sample()` derives: the
student's recommended steps and guidance from its ddil_student.json when a request gives none, and the scheduler
`student_sampling` picks (a student's own saved scheduler, stepped as diffusers steps it; a folder without
ddil_student.json, a teacher, with DDIM). A served image therefore equals the PNG of
`ddil sample --model STUDENT --prompt P --seed S [--steps N] [--guidance W] [--width X --height Y]
[--negative-prompt N] [--eta E]` for the same arguments
(tests/test_serve.py checks it byte for byte).
"""
from __future__ import annotations

import inspect
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
