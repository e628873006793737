"""Stage evaluate: the student against its teacher (and an optional baseline student), under one recorded protocol.

Every model generates the same fixed prompts with the same seeds (seed evaluation.seed + j for the j-th image of
each prompt): the student and baseline with the scheduler saved in their folders (what plain diffusers samples, and
what their rollouts ran in training) at their own recommended steps and guidance (ddil_student.json) and at each of
evaluation.student_steps, the teacher with deterministic DDIM at evaluation.teacher_steps with the teacher's
guidance. Images are embedded by one feature extractor (metrics/extractors.py) and compared with
reference images of the dataset's evaluation split:

- FID: float64 Fréchet distance of the feature Gaussians (metrics/fid.py), with torchmetrics' value on the same
  features as a cross-check (fid_torchmetrics);
- precision, recall, density, coverage with k = evaluation.k (Naeem et al. 2020);
- adherence: the extractor's classifier accuracy on the prompted class (digit captions such as
  "a handwritten digit seven" -> 7), None when the extractor cannot classify or the prompts name no class;
- diversity: mean pairwise feature distance among the K images of a prompt, averaged over prompts;
- cost: NFE per image (steps, x2 under classifier-free guidance) and measured seconds per image in this run.

Writes, built under a temporary name and renamed when complete:
```
out/metrics.json        {"protocol": {...}, "models": {"student": {...}, "teacher": {...}, ...}, "speedup": {...}}
out/metrics_flat.json   the student's scalar metrics, for `dvc metrics show`
out/report.md, report.html, samples_<model>.png (rows = prompts, columns = seeds), quality_vs_steps.png
out/resolved_config.yaml
```
"""
from __future__ import annotations

import gc
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.nn import functional as F

from ddil_core.config import Config
from ddil_core.data.datasets import DatasetError, SkipReport, digit_caption, image_to_tensor, iter_samples
from ddil_core.data.shards import folder_digest, publish_dir, staging_dir
from ddil_core.metrics.diversity import mean_pairwise_distance
from ddil_core.metrics.extractors import Extractor, load_extractor
from ddil_core.metrics.fid import frechet_distance
from ddil_core.metrics.prdc import precision_recall_density_coverage
from ddil_core.metrics.report import plot_quality_vs_steps, save_grid, write_report
from ddil_core.models.pipeline_io import ModelError, check_model_folder, load_pipeline
from ddil_core.models.tiny import DIGIT_WORDS
from ddil_core.stages.common import write_resolved_config
from ddil_core.stages.provenance import check_sampling_steps, check_teacher_of, student_info
from ddil_core.stages.sample import check_trained_grid, generate, sampling_scheduler

log = logging.getLogger(__name__)

METRICS = "metrics.json"
METRICS_FLAT = "metrics_flat.json"
PLOT = "quality_vs_steps.png"
CROSS_CHECK_MAX_DIM = 1024  # torchmetrics' FID (a D x D non-symmetric eig) on CPU only up to this feature size
GRID_MAX_SIDE = 256  # larger samples are downscaled in the grids (the metrics use full-size images)
GRID_MAX_ROWS = 16  # prompts shown in a sample grid (metrics use every prompt)
GRID_MIN_SIDE = 64  # smaller samples are zoomed (nearest) so 16x16 digits stay readable
FLAT_KEYS = ("fid", "precision", "recall", "density", "coverage", "adherence", "diversity", "nfe_per_image",
             "seconds_per_image", "steps", "speedup_seconds", "speedup_nfe")


# ---------------------------------------------------------------------------------------------------- prompts
def read_prompt_file(path: str) -> list[str]:
    """One prompt per non-blank line (surrounding whitespace stripped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: prompts file is not valid UTF-8") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise DatasetError(f"{path}: prompts file has no prompts (one per line)")
    return prompts


def default_prompts(reference_uri: str, captions: list[str]) -> list[str]:
    """demo://digits: the ten digit captions in digit order; otherwise the distinct captions in data order."""
    if reference_uri.startswith("demo://digits"):
        return [digit_caption(i) for i in range(len(DIGIT_WORDS))]
    return list(dict.fromkeys(c.strip() for c in captions if c and c.strip()))


_NUMERAL = {str(i): i for i in range(10)}
_WORD = {w: i for i, w in enumerate(DIGIT_WORDS)}


def prompt_class(prompt: str) -> Optional[int]:
    """The digit class a prompt asks for ("a handwritten digit seven" -> 7, "the number 3" -> 3); None when it
    names no digit or several different ones."""
    found = {(_WORD.get(tok) if tok in _WORD else _NUMERAL.get(tok)) for tok in re.findall(r"[a-z]+|\d+",
                                                                                             prompt.lower())}
    found.discard(None)
    return found.pop() if len(found) == 1 else None


def adherence(predicted: torch.Tensor, wanted: list[int]) -> float:
    """Share of images whose predicted class is the prompted one (`wanted` per image)."""
    wanted_t = torch.as_tensor(wanted, dtype=torch.long)
    if predicted.shape[0] != wanted_t.shape[0]:
        raise ValueError(f"{predicted.shape[0]} predictions for {wanted_t.shape[0]} images")
    return float((predicted.long().cpu() == wanted_t).double().mean())


def nfe_per_image(steps: int, guidance_scale: float, guidance_embedded: bool = False) -> int:
    """UNet evaluations per image: one per step, two under classifier-free guidance (guidance > 1), one when the
    UNet takes the guidance scale as an embedding (LCM students: time_cond_proj_dim), as sample.generate runs."""
    return int(steps) * (2 if guidance_scale > 1.0 and not guidance_embedded else 1)


def guidance_mode(guidance_scale: float, guidance_embedded: bool) -> str:
    if guidance_embedded:
        return "embedded (w - 1 as a UNet input, one pass)"
    return "classifier-free (two passes)" if guidance_scale > 1.0 else "none"


# ---------------------------------------------------------------------------------------------------- reference
def reference_uri(config: Config, reference: Optional[str]) -> str:
    if reference:
        return reference
    dataset = config.data.dataset
    if dataset.startswith("demo://digits"):
        return "demo://digits/eval"  # the held-out split: the teacher was trained on the other one
    return dataset


def reference_features(config: Config, uri: str, resolution: int, extractor: Extractor,
                       batch_size: int = 64) -> tuple[torch.Tensor, list[str], int]:
    """Features [N, D] of the reference images (streamed in batches, never all images in memory), their captions,
    and the number of bad samples skipped."""
    images_root = config.data.images if uri == config.data.dataset else None
    skips = SkipReport()
    feats, captions, batch = [], [], []
    for sample in iter_samples(uri, images_root, config.data.bad_sample_policy, config.evaluation.num_reference,
                               skips, resolution):
        batch.append(((image_to_tensor(sample.image, resolution) + 1) / 2).clamp(0, 1))
        captions.append(sample.caption)
        if len(batch) == batch_size:
            feats.append(extractor.features(torch.stack(batch)))
            batch.clear()
    if batch:
        feats.append(extractor.features(torch.stack(batch)))
    return torch.cat(feats), captions, skips.skipped


# ---------------------------------------------------------------------------------------------------- generation
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
    nfe: int = 0
    guidance_mode: str = ""
    timesteps: Optional[list[int]] = None


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepare(pipe, device: torch.device, dtype: str):
    pipe.to(device)
    if device.type == "cuda" and dtype != "float32":
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
        "sampler": ("multistep consistency (LCMScheduler)" if consistency else "DDIM, eta 0")
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


@torch.no_grad()
def _sample_and_embed(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, sampling: str,
                      resolution: int, batch_size: int, device: torch.device, extractor: Extractor,
                      classify: bool, grid_rows: int):
    """Generate all prompts x seeds (prompt-major) in batches, embedding each batch as it comes (so memory does not
    grow with the number of images). Returns features [N, D], predicted classes [N] or None, the images of the
    first `grid_rows` prompts, and the measured seconds per image (generation only, after an untimed warm-up)."""
    flat_prompts = [p for p in prompts for _ in seeds]
    flat_seeds = [s for _ in prompts for s in seeds]
    keep = grid_rows * len(seeds)
    # Warm-up at the timed batch shape (kernel selection, allocator, caches), one step, not timed.
    generate(pipe, flat_prompts[:batch_size], flat_seeds[:batch_size], 1, guidance, sampling, resolution)
    feats, predicted, grid, seconds = [], [], [], 0.0
    for i in range(0, len(flat_prompts), batch_size):
        _sync(device)
        start = time.perf_counter()
        images = generate(pipe, flat_prompts[i:i + batch_size], flat_seeds[i:i + batch_size], steps, guidance,
                          sampling, resolution)
        _sync(device)
        seconds += time.perf_counter() - start
        feats.append(extractor.features(images))
        if classify:
            predicted.append(extractor.classify(images))
        if i < keep:
            grid.append(images[: keep - i].float().cpu())
    return (torch.cat(feats), torch.cat(predicted) if classify else None, torch.cat(grid),
            seconds / len(flat_prompts))


def _grid_images(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    side = images.shape[-1]
    if side > GRID_MAX_SIDE:
        images = F.interpolate(images, size=(GRID_MAX_SIDE, GRID_MAX_SIDE), mode="bilinear", align_corners=False,
                               antialias=True).clamp(0, 1)
        return images, 1
    return images, max(1, GRID_MIN_SIDE // side)


def _grid_name(key: str) -> str:
    return "samples_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", key.replace("@", "_")) + ("steps" if "@" in key else "") \
        + ".png"


# ---------------------------------------------------------------------------------------------------- metrics
def _torchmetrics_fid(ref: torch.Tensor, fake: torch.Tensor) -> Optional[float]:
    try:
        from ddil_core.metrics.fid import torchmetrics_fid

        return torchmetrics_fid(ref, fake)
    except Exception as exc:  # noqa: BLE001 - a cross-check only: never fails the stage
        log.warning("torchmetrics FID cross-check skipped (%s: %s)", type(exc).__name__, exc)
        return None


def model_metrics(features: torch.Tensor, ref_features: torch.Tensor, num_prompts: int, per_prompt: int, k: int,
                  predicted: Optional[torch.Tensor] = None, wanted: Optional[list[int]] = None,
                  cross_check: bool = False) -> dict:
    """Quality metrics of one model's features [P*K, D] (prompt-major) against reference features."""
    out: dict = {"fid": None}
    if features.shape[0] >= 2 and ref_features.shape[0] >= 2:
        out["fid"] = frechet_distance(ref_features, features)
        if cross_check:
            out["fid_torchmetrics"] = _torchmetrics_fid(ref_features, features)
    prdc = {"precision": None, "recall": None, "density": None, "coverage": None}
    if features.shape[0] > k and ref_features.shape[0] > k:
        prdc = precision_recall_density_coverage(ref_features, features, k=k)
    out.update(prdc)
    out["adherence"] = adherence(predicted, wanted) if predicted is not None and wanted is not None else None
    out["diversity"] = (mean_pairwise_distance(list(features.reshape(num_prompts, per_prompt, -1)))
                        if per_prompt >= 2 else None)
    return out


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------------------------- the stage
def evaluate(config: Config, student: str, teacher: str, out: str | Path, baseline: Optional[str] = None,
             prompts: Optional[str] = None, reference: Optional[str] = None, restart: bool = False) -> dict:
    """Evaluate `student` (and `baseline`) against `teacher`; returns the metrics written to out/metrics.json.
    `restart`: replace an evaluation of another config in `out` (outputs.py: the rerun rule)."""
    from ddil_core.stages.common import stage_run

    out = Path(out)
    inputs = (student, teacher, baseline, prompts, reference)
    with stage_run(config, "evaluate", out, restart=restart, inputs=inputs) as tel:
        tmp = staging_dir(out)
        try:
            metrics = _evaluate(config, str(student), str(teacher), tmp, baseline and str(baseline), prompts,
                                reference)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_dir(tmp, out)
        tel.eval_results(metrics)
    log.info("evaluation written to %s (student FID %s, teacher FID %s)", out,
             metrics["models"]["student"].get("fid"), metrics["models"]["teacher"].get("fid"))
    return metrics


def _check_model_uri(uri: str, role: str, allow_pickle: bool) -> None:
    """A local model folder is validated now; tiny://, s3:// and hub ids are checked when loaded."""
    if uri.startswith(("tiny://", "s3://")):
        return
    path = Path(uri)
    if path.exists():
        check_model_folder(path, allow_pickle)
    elif uri.startswith((".", "/")) or uri.count("/") != 1:
        raise ModelError(f"{role} model not found: {uri}")


def _student_settings(folder: str, config: Config, teacher_guidance: float, role: str) -> tuple[int, float, dict]:
    info = student_info(folder)
    if info is None:
        log.warning("%s %s has no ddil_student.json: sampling it with objective.student_steps = %d and the "
                    "teacher's guidance %g", role, folder, config.objective.student_steps, teacher_guidance)
        return config.objective.student_steps, teacher_guidance, {}
    return int(info["num_inference_steps"]), float(info.get("guidance_scale", 1.0)), info


def _evaluate(config: Config, student: str, teacher: str, tmp: Path, baseline: Optional[str],
              prompts_file: Optional[str], reference: Optional[str]) -> dict:
    ev = config.evaluation
    device = _device()
    teacher_guidance = float(ev.teacher_guidance_scale if ev.teacher_guidance_scale is not None
                             else config.objective.guidance_scale)

    # Fail early on bad input: the prompts file, the model folders and the extractor, before any sampling.
    for role, uri in (("student", student), ("baseline", baseline), ("teacher", teacher)):
        if uri:
            _check_model_uri(uri, role, config.model.allow_pickle)
    file_prompts = read_prompt_file(prompts_file or ev.prompts) if (prompts_file or ev.prompts) else None
    student_steps, student_guidance, student_info = _student_settings(student, config, teacher_guidance, "student")
    baseline_settings = (_student_settings(baseline, config, teacher_guidance, "baseline")
                         if baseline else None)
    for role, folder, settings in (("student", student, (student_steps, student_guidance, student_info)),
                                   ("baseline", baseline, baseline_settings)):
        if folder:
            check_sampling_steps(folder, role, [settings[0], *ev.student_steps])
    extractor: Extractor = load_extractor(ev.extractor, device, teacher=teacher)

    loaded = load_pipeline(teacher, config.model.family, config.model.allow_pickle)
    check_teacher_of(loaded, teacher, config, [("student", student, student_info),
                                                ("baseline", baseline, baseline_settings and baseline_settings[2])])
    teacher_pipe = _prepare(loaded, device, config.model.dtype)
    resolution = config.model.resolution or teacher_pipe.unet.config.sample_size * teacher_pipe.vae_scale_factor

    ref_uri = reference_uri(config, reference)
    ref_features, ref_captions, ref_skipped = reference_features(config, ref_uri, resolution, extractor)
    prompt_list = (file_prompts or default_prompts(ref_uri, ref_captions))[: ev.num_prompts]
    if not prompt_list:
        raise DatasetError(f"{ref_uri}: no captions to use as evaluation prompts (set evaluation.prompts)")
    seeds = [ev.seed + j for j in range(ev.images_per_prompt)]
    classes = [prompt_class(p) for p in prompt_list]
    wanted = None
    if extractor.can_classify and all(c is not None for c in classes):
        wanted = [c for c in classes for _ in seeds]
        adherence_note = f"accuracy of {extractor.name} on the prompted class"
    elif not extractor.can_classify:
        adherence_note = f"not computed: extractor {extractor.name} does not classify (no CLIP score offline)"
    else:
        missing = [p for p, c in zip(prompt_list, classes) if c is None]
        adherence_note = f"not computed: prompts name no class ({missing[:3]}{' ...' if len(missing) > 3 else ''})"

    runs: list[Run] = []

    def run_model(pipe, key: str, family: str, steps: int, guidance: float, info: Optional[dict], where: str) -> None:
        sampling = _sampling(pipe, family, steps, info, where)
        scheduler = sampling_scheduler(pipe, sampling)
        sched_cfg = dict(scheduler.config)
        scheduler.set_timesteps(steps)
        timesteps = [int(t) for t in scheduler.timesteps.tolist()]
        consistency = type(scheduler).__name__ == "LCMScheduler"
        embedded = pipe.unet.config.get("time_cond_proj_dim") is not None
        log.info("evaluate: %s, %d steps, guidance %g: %d images", key, steps, guidance,
                 len(prompt_list) * len(seeds))
        feats, predicted, images, seconds = _sample_and_embed(
            pipe, prompt_list, seeds, steps, guidance, sampling, resolution, ev.batch_size, device, extractor,
            wanted is not None, GRID_MAX_ROWS)
        run = Run(key, family, steps, guidance,
                  _scheduler_record(sched_cfg, family, type(scheduler).__name__, consistency),
                  seconds, feats, predicted)
        run.nfe = nfe_per_image(steps, guidance, embedded)
        run.guidance_mode = guidance_mode(guidance, embedded)
        run.timesteps = timesteps
        grid_images, zoom = _grid_images(images)
        run.grid = _grid_name(key)
        save_grid(grid_images, tmp / run.grid, ncols=len(seeds), upscale=zoom)
        runs.append(run)

    def extra_steps(own: int) -> list[int]:
        return sorted({n for n in ev.student_steps if n != own})

    run_model(teacher_pipe, "teacher", "teacher", ev.teacher_steps, teacher_guidance, None, teacher)
    del teacher_pipe
    _free(device)

    todo = [("student", student, (student_steps, student_guidance, student_info))]
    if baseline:
        todo.append(("baseline", baseline, baseline_settings))
    for role, folder, (steps, guidance, info) in todo:
        pipe = _prepare(load_pipeline(folder, "auto", config.model.allow_pickle), device, config.model.dtype)
        run_model(pipe, role, role, steps, guidance, info, folder)
        for n in extra_steps(steps):
            run_model(pipe, f"{role}@{n}", role, n, guidance, info, folder)
        del pipe
        _free(device)

    # Metrics, in the order: student, student@N..., teacher, baseline, baseline@N...
    order = {"student": 0, "teacher": 1, "baseline": 2}
    runs.sort(key=lambda r: (order[r.family], r.key != r.family, r.steps))
    models: dict[str, dict] = {}
    dim = int(ref_features.shape[1])
    cross_check = bool(ev.fid_cross_check) and (dim <= CROSS_CHECK_MAX_DIM or device.type == "cuda")
    for r in runs:
        m = {"steps": r.steps, "guidance_scale": r.guidance_scale, "nfe_per_image": r.nfe,
             "seconds_per_image": r.seconds_per_image}
        m.update(model_metrics(r.features, ref_features, len(prompt_list), len(seeds), ev.k, r.predicted, wanted,
                               cross_check))
        m["num_images"] = int(r.features.shape[0])
        models[r.key] = m
    t = models["teacher"]
    speedup = {"reference_model": "teacher", "per_model": {}}
    for key, m in models.items():
        m["speedup_seconds"] = _ratio(t["seconds_per_image"], m["seconds_per_image"])
        m["speedup_nfe"] = _ratio(t["nfe_per_image"], m["nfe_per_image"])
        if key != "teacher":
            speedup["per_model"][key] = {"seconds": m["speedup_seconds"], "nfe": m["speedup_nfe"]}
    speedup["seconds"] = models["student"]["speedup_seconds"]  # teacher seconds / student seconds per image
    speedup["nfe"] = models["student"]["speedup_nfe"]  # teacher NFE / student NFE per image

    protocol = {
        "extractor": extractor.name,
        "extractor_requested": ev.extractor,
        "resize": extractor.resize,
        "feature_dim": int(ref_features.shape[1]),
        **({"extractor_note": extractor.note} if extractor.note else {}),
        "fid": "float64 Fréchet distance of feature Gaussians (ddil_core.metrics.frechet_distance)"
               + ("; fid_torchmetrics: torchmetrics FrechetInceptionDistance on the same features (cross-check)"
                  if cross_check else ""),
        "k": ev.k,
        "prdc": "precision/recall/density/coverage, Naeem et al. 2020, k-NN balls in feature space",
        "adherence": adherence_note,
        "diversity": "mean pairwise euclidean feature distance among the images of one prompt, averaged over prompts",
        "nfe": "UNet evaluations per image: steps, x2 under classifier-free guidance (guidance_scale > 1 and no "
               "guidance embedding)",
        "timing": f"wall seconds per image on {device.type} in this run (text encoding, sampling and VAE decode; "
                  f"batches of {ev.batch_size}, after one untimed one-step warm-up batch per model)",
        "prompts": prompt_list,
        "prompt_source": prompts_file or ev.prompts or f"distinct captions of {ref_uri}",
        "seeds": seeds,
        "images_per_prompt": len(seeds),
        "resolution": resolution,
        "device": device.type,
        "dtype": config.model.dtype if device.type == "cuda" else "float32",
        "steps": {r.key: r.steps for r in runs},
        "guidance": {r.key: r.guidance_scale for r in runs},
        "guidance_mode": {r.key: r.guidance_mode for r in runs},
        **({"timesteps": {r.key: r.timesteps for r in runs if r.timesteps}} if any(r.timesteps for r in runs)
           else {}),
        "scheduler": {r.family: r.scheduler for r in runs},  # student@N runs share the student's scheduler
        "reference": ref_uri,
        "num_reference": int(ref_features.shape[0]),
        **({"reference_skipped": ref_skipped} if ref_skipped else {}),
        "model_paths": {"student": student, "teacher": teacher, **({"baseline": baseline} if baseline else {})},
        # What register checks: these metrics belong to the student folder it is given (stages/register.py).
        "model_digests": {role: folder_digest(Path(folder)) for role, folder in (("student", student),
                                                                                ("baseline", baseline))
                          if folder and Path(folder).is_dir()},
    }
    if student_info:
        protocol["student_info"] = {k: v for k, v in student_info.items() if not isinstance(v, (dict, list))}
    metrics = {"protocol": protocol, "models": models, "speedup": speedup}

    plot = None
    student_runs = [r for r in runs if r.family == "student"]
    if len(student_runs) > 1:
        rows = [{"model": r.family, "steps": r.steps, "fid": models[r.key]["fid"]} for r in runs]
        plot = plot_quality_vs_steps(rows, tmp / PLOT, title="FID vs sampling steps "
                                     f"({extractor.name.split(':')[0]} features)").name
    shown = "" if len(prompt_list) <= GRID_MAX_ROWS else f" (first {GRID_MAX_ROWS} prompts)"
    grids = {f"{r.key}: {r.steps} steps, guidance {r.guidance_scale:g}{shown}": r.grid for r in runs}
    write_report(tmp, _json_safe(metrics), grids, plot)
    _write_json(tmp / METRICS, metrics)
    flat = {k: v for k, v in models["student"].items() if k in FLAT_KEYS and v is not None}
    if models["teacher"].get("fid") is not None:
        flat["teacher_fid"] = models["teacher"]["fid"]
    if "baseline" in models and models["baseline"].get("fid") is not None:
        flat["baseline_fid"] = models["baseline"]["fid"]
    _write_json(tmp / METRICS_FLAT, flat)
    write_resolved_config(tmp, config, "evaluate")
    return _json_safe(metrics)


def _ratio(num, den) -> Optional[float]:
    try:
        num, den = float(num), float(den)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return None
    return num / den


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
