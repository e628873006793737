"""Stage diagnose: the covariate-shift curve of a student against its teacher (metrics/covariate_shift.py).

For diagnose.num_noises noises z (noise i from seed diagnose.seed + i, as `ddil sample --seed` draws it) with
prompts cycled from the evaluation prompts, the student runs its shipped sampler (models/sampling.py: its saved
scheduler at its recommended steps and guidance, ddil_student.json) and the teacher the teacher's version of each
step (method/teacher_reference.py, guided at the rollouts' guidance with rollouts.teacher_steps DDIM steps over the
student's grid). The final images of both are also compared in the evaluation extractor's feature space.

Writes, built under a temporary name and renamed when complete:
```
out/diagnose.json        protocol, the curves with 95% intervals (e_T, e_S, R, D, C, hand-over), per-noise values
out/diagnose_flat.json   the headline scalars, for `dvc metrics show`
out/covariate_shift.png  R(k) and the drift D(k) against the student step k
out/handover.png         the final distance to the teacher when the teacher takes the first m steps
out/resolved_config.yaml
```
evaluate runs the same measurement (`measure`) into its metrics.json and report when diagnose.in_evaluate is set,
or, given this stage's folder (`--covariate-shift`), takes its result after checking that it measured the same
student folder (by digest) with the same settings (`load_diagnosis`): the DVC pipeline measures the curve once.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ddil_core.config import Config, ConfigError
from ddil_core.config.redaction import redacted_json
from ddil_core.data.shards import folder_digest, publish_dir, staging_dir
from ddil_core.math.schedule import NoiseSchedule
from ddil_core.method.teacher_reference import TeacherReference
from ddil_core.metrics.covariate_shift import concat, headline, summarize, trajectory_errors
from ddil_core.metrics.plots import plot_lines
from ddil_core.models import placement
from ddil_core.models.conditioning import encode_prompts, encode_unconditional
from ddil_core.models.latents import decode_latents
from ddil_core.models.pipeline_io import ModelError
from ddil_core.models.sampling import ShippedSampler, is_interval_sampler
from ddil_core.models.teacher import rollout_guidance

log = logging.getLogger(__name__)
RESULT, FLAT, SHIFT_PLOT, HANDOVER_PLOT = "diagnose.json", "diagnose_flat.json", "covariate_shift.png", "handover.png"


@torch.no_grad()
def measure(config: Config, student_pipe, info: Optional[dict], teacher_pipe, prompts: list[str], resolution: int,
            extractor=None, num_noises: Optional[int] = None) -> dict:
    """The covariate-shift summary of a loaded student against a loaded teacher (JSON-ready), with per-noise
    values under "samples"."""
    from ddil_core.models.sampling import sampling_scheduler, student_sampling

    d = config.diagnose
    m = int(num_noises or d.num_noises)
    steps = int(info["num_inference_steps"]) if info else config.objective.student_steps
    guidance = float(info.get("guidance_scale", 1.0)) if info else float(rollout_guidance(config))
    kind, _ = student_sampling(student_pipe, info)
    scheduler = sampling_scheduler(student_pipe, kind)
    seeds = [d.seed + i for i in range(m)]
    row_prompts = [prompts[i % len(prompts)] for i in range(m)]
    sampler = ShippedSampler(student_pipe, scheduler, steps, guidance, row_prompts, seeds, resolution)
    w = float(rollout_guidance(config))
    t_cond = encode_prompts(teacher_pipe, row_prompts, resolution)
    t_uncond = encode_unconditional(teacher_pipe, resolution) if w != 1.0 else None
    # The teacher's last interval ends where the scheduler's last step lands: DDIM on the folder's final alpha, a
    # consistency step at the clean estimate (alpha 1).
    final_alpha_one = (bool(scheduler.config.get("set_alpha_to_one", True)) if is_interval_sampler(scheduler)
                       else True)
    t_schedule = NoiseSchedule.from_config(dict(teacher_pipe.scheduler.config), set_alpha_to_one=final_alpha_one)
    reference = TeacherReference(sampler, teacher_pipe.unet, t_schedule, t_cond, t_uncond, w,
                                 config.rollouts.teacher_steps)
    device, dtype = placement(student_pipe.unet)
    side = resolution // student_pipe.vae_scale_factor
    channels = student_pipe.unet.config.in_channels
    parts, feature_drift = [], []
    for start in range(0, m, d.batch_size):
        rows = torch.arange(start, min(m, start + d.batch_size))
        z = torch.stack([torch.randn((channels, side, side), generator=torch.Generator("cpu").manual_seed(seeds[i]))
                         for i in rows.tolist()]).to(device, dtype) * sampler.init_noise_sigma
        part, x_s, x_t = trajectory_errors(sampler.step, reference.step, z, steps, rows)
        parts.append(part)
        if extractor is not None:
            f_s = extractor.features(decode_latents(student_pipe.vae, x_s))
            f_t = extractor.features(decode_latents(teacher_pipe.vae, x_t.to(x_s.dtype)))
            feature_drift.append((f_s - f_t).pow(2).mean(1).numpy())
    samples = concat(parts)
    summary = summarize(samples, d.bootstrap, d.seed, np.concatenate(feature_drift) if feature_drift else None)
    summary["headline"] = headline(summary)
    summary["protocol"] = {
        "student_steps": steps, "student_guidance": guidance, "timesteps": sampler.timesteps,
        "scheduler": type(scheduler).__name__,
        "reference": ("teacher's guided DDIM over each interval" if is_interval_sampler(scheduler) else
                      "the scheduler's step with the teacher's clean estimate (guided DDIM to 0), same noise"),
        "teacher_guidance": w, "teacher_steps": config.rollouts.teacher_steps, "seeds": [seeds[0], seeds[-1]],
        "bootstrap": d.bootstrap,
        "prompts": sorted(set(row_prompts)), "resolution": resolution,
        "distance": "mean squared difference per latent element",
        **({"feature_distance": f"mean squared difference per {extractor.name} feature of the final images"}
           if extractor is not None else {}),
    }
    summary["samples"] = {"e_teacher": samples.e_teacher.tolist(), "e_student": samples.e_student.tolist(),
                          "drift_final": samples.drift_final.tolist()}
    return summary


def write_plots(folder: Path, summary: dict, label: str = "student") -> tuple[Path, Path]:
    """R(k) and D(k) against the step k; the hand-over curve H(m)."""
    n = summary["num_steps"]
    shift = {"R(k) = e_S / e_T": [(k, r["value"]) for k, r in enumerate(summary["shift_factor"])
                                  if r["value"] is not None]}
    top = max([v for _, v in shift["R(k) = e_S / e_T"]] or [1.0])
    drift_max = max(r["value"] for r in summary["drift"]) or 1.0
    shift[f"D(k) drift (scaled: {drift_max:.3g} = {top:.3g})"] = [(k, r["value"] / drift_max * top)
                                                                  for k, r in enumerate(summary["drift"])]
    a = plot_lines(shift, folder / SHIFT_PLOT, f"Covariate shift of the {label} ({n} steps)", "student step k",
                   "factor")
    b = plot_lines({"final distance to the teacher": [(j, r["value"]) for j, r in enumerate(summary["handover"])]},
                   folder / HANDOVER_PLOT, "Hand-over: the teacher takes the first m steps", "m", "distance")
    return a, b


def diagnose(config: Config, student: str, teacher: str, out: str | Path, prompts: Optional[str] = None,
             restart: bool = False, reference: Optional[str] = None) -> dict:
    """Measure `student` against `teacher` into `out`; returns the summary written to out/diagnose.json. The prompts:
    the `prompts` file, else the distinct captions of `reference` (default: evaluate's), in evaluate's order."""
    from ddil_core.metrics.extractors import load_extractor
    from ddil_core.models.pipeline_io import load_pipeline
    from ddil_core.stages.common import stage_run
    from ddil_core.stages.evaluate import check_model_uri
    from ddil_core.stages.evaluate.inputs import evaluation_prompts, read_prompt_file, reference_uri
    from ddil_core.stages.evaluate.sampling import device, prepare
    from ddil_core.stages.outputs import write_resolved_config
    from ddil_core.stages.provenance import student_info

    out = Path(out)
    with stage_run(config, "diagnose", out, restart=restart, inputs=(student, teacher, prompts, reference)) as tel:
        for role, uri in (("student", student), ("teacher", teacher)):
            check_model_uri(uri, role, config.model.allow_pickle)
        info = student_info(student)
        prompt_file = prompts or config.evaluation.prompts
        file_prompts = read_prompt_file(prompt_file) if prompt_file else None
        ref_uri = reference_uri(config, reference)
        prompt_list = evaluation_prompts(config, file_prompts, ref_uri,
                                         [] if file_prompts else _captions(config, ref_uri))
        dev = device()
        teacher_pipe = prepare(load_pipeline(teacher, config.model.family, config.model.allow_pickle), dev,
                               config.model.dtype)
        student_pipe = prepare(load_pipeline(student, "auto", config.model.allow_pickle), dev, config.model.dtype)
        resolution = config.model.resolution or teacher_pipe.unet.config.sample_size * teacher_pipe.vae_scale_factor
        extractor = load_extractor(config.evaluation.extractor, dev, teacher=teacher)
        tmp = staging_dir(out)
        try:
            summary = measure(config, student_pipe, info, teacher_pipe, prompt_list, resolution, extractor)
            summary["protocol"]["model_paths"] = {"student": str(student), "teacher": str(teacher)}
            summary["protocol"]["prompt_list"] = prompt_list  # noise i has prompt i mod len: the order matters
            summary["protocol"]["model_digests"] = {role: folder_digest(Path(folder)) for role, folder in
                                                    (("student", student), ("teacher", teacher))
                                                    if Path(folder).is_dir()}
            write_plots(tmp, summary)
            (tmp / RESULT).write_text(redacted_json(summary, indent=1, allow_nan=False) + "\n", encoding="utf-8")
            (tmp / FLAT).write_text(redacted_json({k: v for k, v in summary["headline"].items() if v is not None},
                                               indent=1) + "\n", encoding="utf-8")
            write_resolved_config(tmp, config, "diagnose")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_dir(tmp, out)
        tel.eval_results({"models": {"student": {f"covariate_{k}": v for k, v in summary["headline"].items()}}})
    log.info("covariate shift of %s written to %s: %s", student, out, summary["headline"])
    return summary


def load_diagnosis(folder: str | Path, config: Config, student: str, teacher: str, prompts: list[str]) -> dict:
    """The summary diagnose wrote to folder/diagnose.json (without its per-noise values), refused with the file and
    the differing value named unless it measured these model folders (by digest) with the settings `measure` would
    use here: the noises, the intervals' resamples, the teacher's steps and guidance, the prompts."""
    path = Path(folder) / RESULT
    if not path.is_file():
        raise ModelError(f"{path}: no diagnosis here (run `ddil diagnose --out {folder}` first)")
    summary = json.loads(path.read_text(encoding="utf-8"))
    protocol = summary.get("protocol") or {}
    digests = protocol.get("model_digests") or {}
    for role, folder_ in (("student", student), ("teacher", teacher)):
        if Path(folder_).is_dir() and digests.get(role) != folder_digest(Path(folder_)):
            raise ModelError(f"{path}: measured another {role} than {folder_} (protocol.model_digests.{role}); "
                             f"rerun diagnose on it")
    d, m = config.diagnose, config.diagnose.num_noises
    expected = {"seeds": [d.seed, d.seed + m - 1], "bootstrap": d.bootstrap,
                "teacher_steps": config.rollouts.teacher_steps, "teacher_guidance": float(rollout_guidance(config)),
                "prompt_list": list(prompts)}
    for key, value in expected.items():
        if protocol.get(key) != value:
            raise ConfigError(f"{path}: protocol.{key} is {protocol.get(key)!r}, this config measures {value!r} "
                              f"(diagnose.*, rollouts.teacher_steps, the guidance, the prompts); rerun diagnose")
    summary.pop("samples", None)
    return summary


def _captions(config: Config, uri: str) -> list[str]:
    """The captions of the reference `uri` in data order, for prompts when no prompt file is given, as evaluate reads
    them (the digits: their ten captions)."""
    from ddil_core.data.datasets import iter_samples
    from ddil_core.data.digits import demo_source

    if demo_source(uri):
        return []
    images_root = config.data.images if uri == config.data.dataset else None
    return [s.caption for s in iter_samples(uri, images_root, "skip", limit=config.evaluation.num_prompts * 8)]
