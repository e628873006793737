"""How evaluate samples each model: the same prompts and seeds for every model, in batches embedded as they come,
timed after an untimed warm-up, with its sample grid (rows labelled with their prompts) and one-row strips of the
first seeds for the side-by-side table of the report."""
from __future__ import annotations

import gc
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.nn import functional as F

from ddil_core.metrics.extractors import Extractor
from ddil_core.metrics.plots import save_grid
from ddil_core.progress import Progress
from ddil_core.models.sampling import check_trained_grid, generate, sampling_scheduler, student_eta

GRID_MAX_SIDE = 256  # larger samples are downscaled in the grids (the metrics use full-size images)
GRID_MAX_ROWS = 16  # prompts shown in a sample grid (metrics use every prompt)
GRID_MIN_SIDE = 64  # smaller samples are zoomed (nearest) so 16x16 digits stay readable
STRIP_SEEDS = 8  # seeds shown per model in the side-by-side table (the grids show every seed)
STRIP_SIDE = 32  # their cells: small samples zoomed up to this side, large ones downscaled to twice it
STRIPS = "rows"  # the folder of the strips, inside the evaluation folder


@dataclass
class Setup:
    """What every model of one evaluation is sampled with."""

    prompts: list[str]
    seeds: list[int]
    resolution: int
    batch_size: int
    device: torch.device
    extractor: Extractor
    classify: bool  # whether adherence is measured (the extractor classifies and every prompt names a class)
    out: Path  # where the grids and strips are written


@dataclass
class Run:
    key: str  # "student", "student@1", "teacher", "baseline", ...
    family: str  # "student", "teacher", "baseline": the curve this run belongs to in the plot
    steps: int
    guidance_scale: float
    scheduler: dict
    seconds_per_image: float = math.nan
    features: Optional[torch.Tensor] = None
    predicted: Optional[torch.Tensor] = None
    grid: Optional[str] = None
    strips: list[str] = field(default_factory=list)  # one PNG per prompt shown (the first STRIP_SEEDS seeds)
    nfe: int = 0
    guidance_mode: str = ""
    timesteps: Optional[list[int]] = None
    eta: float = 0.0  # the `eta` its scheduler was stepped with (a TDD student's TCD gamma)


def nfe_per_image(steps: int, guidance_scale: float, guidance_embedded: bool = False) -> int:
    """UNet evaluations per image: one per step, two under classifier-free guidance (guidance > 1), one when the
    UNet takes the guidance scale as an embedding (LCM students: time_cond_proj_dim), as sample.generate runs."""
    return int(steps) * (2 if guidance_scale > 1.0 and not guidance_embedded else 1)


def guidance_mode(guidance_scale: float, guidance_embedded: bool) -> str:
    if guidance_embedded:
        return "embedded (w - 1 as a UNet input, one pass)"
    return "classifier-free (two passes)" if guidance_scale > 1.0 else "none"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def prepare(pipe, dev: torch.device, dtype: str):
    pipe.to(dev)
    if dev.type == "cuda" and dtype != "float32":
        pipe.to(dtype=getattr(torch, dtype))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval().requires_grad_(False)
    return pipe


def _sampling(pipe, role: str, steps: int, info: Optional[dict], where: str) -> str:
    """How sample.generate runs this model: the teacher as DDIM on its scheduler config; a student with the
    scheduler saved in its folder (what plain diffusers runs), checked to sample the grid it was trained on."""
    if role == "teacher":
        return "ddim"
    check_trained_grid(sampling_scheduler(pipe, "own"), steps, (info or {}).get("timesteps"), where)
    return "own"


def _scheduler_record(cfg: dict, source: str, class_name: Optional[str], consistency: bool) -> dict:
    return {
        "sampler": ("multistep consistency (LCMScheduler)" if consistency else
                    "TCD gamma sampler on the TDD grid" if class_name == "TCDScheduler" else "DDIM, eta 0")
        + f", diffusers {class_name}.step in ddil_core.stages.sample.generate",
        "thresholding": cfg.get("thresholding", False),
        "clip_sample": cfg.get("clip_sample", False),
        "config_of": source,
        "config_class": class_name or cfg.get("_class_name"),
        "timestep_spacing": cfg.get("timestep_spacing", "leading"),
        "steps_offset": cfg.get("steps_offset", 0),
        "set_alpha_to_one": cfg.get("set_alpha_to_one", True),
        "prediction_type": cfg.get("prediction_type", "epsilon"),
        "beta_schedule": cfg.get("beta_schedule"),
    }


def _resized(images: torch.Tensor, max_side: int) -> torch.Tensor:
    if images.shape[-1] <= max_side:
        return images
    return F.interpolate(images, size=(max_side, max_side), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def grid_name(key: str) -> str:
    return "samples_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", key.replace("@", "_")) + ("steps" if "@" in key else "") \
        + ".png"


@torch.no_grad()
def sample_run(pipe, key: str, family: str, steps: int, guidance: float, info: Optional[dict], where: str,
               setup: Setup) -> Run:
    """Generate every prompt x seed (prompt-major) in batches, embedding each batch as it comes (memory does not grow
    with the number of images); the seconds per image count generation only, after an untimed one-step warm-up at
    the timed batch shape (kernel selection, allocator, caches). Writes the model's grid and strips."""
    sampling = _sampling(pipe, family, steps, info, where)
    scheduler = sampling_scheduler(pipe, sampling)
    sched_cfg = dict(scheduler.config)
    scheduler.set_timesteps(steps)
    embedded = pipe.unet.config.get("time_cond_proj_dim") is not None
    run = Run(key, family, steps, guidance, _scheduler_record(sched_cfg, family, type(scheduler).__name__,
                                                              type(scheduler).__name__ == "LCMScheduler"),
              nfe=nfe_per_image(steps, guidance, embedded), guidance_mode=guidance_mode(guidance, embedded),
              timesteps=[int(t) for t in scheduler.timesteps.tolist()])
    prompts = [p for p in setup.prompts for _ in setup.seeds]
    seeds = [s for _ in setup.prompts for s in setup.seeds]
    rows = min(GRID_MAX_ROWS, len(setup.prompts))
    keep, bs = rows * len(setup.seeds), setup.batch_size
    eta = student_eta(info, sampling)  # a TDD student's TCD gamma; None: the pipelines' 0.0
    run.eta = eta or 0.0
    if eta:
        run.scheduler["sampler"] += f", eta {eta:g}"
    generate(pipe, prompts[:bs], seeds[:bs], 1, guidance, sampling, setup.resolution, eta=eta)
    feats, predicted, shown, seconds = [], [], [], 0.0
    with Progress(f"evaluate: {key} at {steps} steps", len(prompts), unit="image") as progress:
        for i in range(0, len(prompts), bs):
            _sync(setup.device)
            start = time.perf_counter()
            images = generate(pipe, prompts[i:i + bs], seeds[i:i + bs], steps, guidance, sampling, setup.resolution,
                              eta=eta)
            _sync(setup.device)
            seconds += time.perf_counter() - start
            feats.append(setup.extractor.features(images))
            if setup.classify:
                predicted.append(setup.extractor.classify(images))
            if i < keep:  # the grid's images, downscaled as they come
                shown.append(_resized(images[: keep - i].float().cpu(), GRID_MAX_SIDE))
            progress.update(len(images))
    run.seconds_per_image = seconds / len(prompts)
    run.features = torch.cat(feats)
    run.predicted = torch.cat(predicted) if setup.classify else None
    grid = torch.cat(shown).reshape(rows, len(setup.seeds), *shown[0].shape[1:])
    run.grid = grid_name(key)
    side = grid.shape[-1]
    save_grid(grid, setup.out / run.grid, upscale=max(1, GRID_MIN_SIDE // side), row_labels=setup.prompts[:rows])
    strips = grid[:, :STRIP_SEEDS]
    if side > 2 * STRIP_SIDE:
        strips = _resized(strips.flatten(0, 1), 2 * STRIP_SIDE).reshape(*strips.shape[:3], 2 * STRIP_SIDE,
                                                                         2 * STRIP_SIDE)
    zoom = max(1, STRIP_SIDE // strips.shape[-1])
    stem = run.grid[: -len(".png")]
    for r in range(rows):
        name = f"{STRIPS}/{stem}-{r:02d}.png"
        save_grid(strips[r:r + 1], setup.out / name, pad=2, upscale=zoom)
        run.strips.append(name)
    return run
