"""Stage sample: one image from a teacher or student pipeline, with the sampler the folder ships
(ddil_core/models/sampling.py: a student's saved scheduler at its recommended steps, guidance and eta; a teacher
with DDIM; `--scheduler ddim` asks for DDIM on a student too).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import torch

from ddil_core.models.pipeline_io import load_pipeline
from ddil_core.models.sampling import (check_trained_grid, default_guidance, default_steps, generate,
                                       sampling_scheduler, student_eta, student_sampling, to_pil)
from ddil_core.models.student_record import validate_student_folder


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
    info = validate_student_folder(model, "model") if Path(model).is_dir() else None
    pipe = load_pipeline(model, allow_pickle=allow_pickle)
    if steps is None:
        steps = default_steps(info)
    if guidance_scale is None:
        guidance_scale = default_guidance(info)
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
