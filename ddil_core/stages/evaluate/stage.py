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
out/report.md, report.html  the gate verdict, the metrics, which FID this is, the samples side by side
out/samples_<model>.png     rows = prompts (labelled), columns = seeds; rows/: one strip per prompt of the first seeds
out/quality_vs_steps.png    FID against sampling steps, per model
out/resolved_config.yaml
```
The parts: inputs.py (prompts, reference), sampling.py (how each model is sampled and shown), results.py (metrics,
speed-ups, verdict, report, JSON files); this file runs them in order.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

from ddil_core.config import Config
from ddil_core.data.datasets import DatasetError
from ddil_core.data.shards import folder_digest, publish_dir, staging_dir
from ddil_core.metrics.extractors import Extractor, load_extractor
from ddil_core.data.digits import prompt_class
from ddil_core.models.pipeline_io import ModelError, check_model_folder, load_pipeline, missing_folder_error
from ddil_core.stages.common import write_resolved_config
from ddil_core.stages.evaluate.inputs import (check_teacher_of, evaluation_prompts, read_prompt_file,
                                              reference_features, reference_uri)
from ddil_core.stages.diagnose import load_diagnosis, measure
from ddil_core.stages.evaluate.results import json_safe, model_metrics, speedups, write_outputs
from ddil_core.stages.evaluate.sampling import Run, Setup, device, free, prepare, sample_run
from ddil_core.stages.provenance import check_sampling_steps, student_info

log = logging.getLogger(__name__)
CROSS_CHECK_MAX_DIM = 1024  # torchmetrics' FID (a D x D non-symmetric eig) on CPU only up to this feature size


# ---------------------------------------------------------------------------------------------------- the stage
def evaluate(config: Config, student: str, teacher: str, out: str | Path, baseline: Optional[str] = None,
             prompts: Optional[str] = None, reference: Optional[str] = None, restart: bool = False,
             covariate_shift: Optional[str] = None) -> dict:
    """Evaluate `student` (and `baseline`) against `teacher`; returns the metrics written to out/metrics.json.
    `restart`: replace an evaluation of another config in `out` (outputs.py: the rerun rule). `covariate_shift`: a
    diagnose folder of this student, whose curve is taken instead of measured again (stages/diagnose.py)."""
    from ddil_core.stages.common import stage_run

    out = Path(out)
    inputs = (student, teacher, baseline, prompts, reference, covariate_shift)
    with stage_run(config, "evaluate", out, restart=restart, inputs=inputs) as tel:
        tmp = staging_dir(out)
        try:
            metrics = _evaluate(config, str(student), str(teacher), tmp, baseline and str(baseline), prompts,
                                reference, covariate_shift)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_dir(tmp, out)
        tel.eval_results(metrics)
    log.info("evaluation written to %s (student FID %s, teacher FID %s)", out,
             metrics["models"]["student"].get("fid"), metrics["models"]["teacher"].get("fid"))
    return metrics


def check_model_uri(uri: str, role: str, allow_pickle: bool) -> None:
    """A local model folder is validated now; tiny://, s3:// and hub ids are checked when loaded."""
    if uri.startswith(("tiny://", "s3://")):
        return
    path = Path(uri)
    if path.exists():
        check_model_folder(path, allow_pickle)
    elif missing_folder_error(uri, role) is not None:
        raise ModelError(missing_folder_error(uri, role))


def _student_settings(folder: str, config: Config, teacher_guidance: float, role: str) -> tuple[int, float, dict]:
    info = student_info(folder)
    if info is None:
        log.warning("%s %s has no ddil_student.json: sampling it with objective.student_steps = %d and the "
                    "teacher's guidance %g", role, folder, config.objective.student_steps, teacher_guidance)
        return config.objective.student_steps, teacher_guidance, {}
    return int(info["num_inference_steps"]), float(info.get("guidance_scale", 1.0)), info


def _evaluate(config: Config, student: str, teacher: str, tmp: Path, baseline: Optional[str],
              prompts_file: Optional[str], reference: Optional[str], covariate_shift: Optional[str] = None) -> dict:
    ev = config.evaluation
    dev = device()
    teacher_guidance = float(ev.teacher_guidance_scale if ev.teacher_guidance_scale is not None
                             else config.objective.guidance_scale)

    # Fail early on bad input: the prompts file, the model folders and the extractor, before any sampling.
    for role, uri in (("student", student), ("baseline", baseline), ("teacher", teacher)):
        if uri:
            check_model_uri(uri, role, config.model.allow_pickle)
    file_prompts = read_prompt_file(prompts_file or ev.prompts) if (prompts_file or ev.prompts) else None
    student_steps, student_guidance, student_info = _student_settings(student, config, teacher_guidance, "student")
    baseline_settings = (_student_settings(baseline, config, teacher_guidance, "baseline")
                         if baseline else None)
    for role, folder, settings in (("student", student, (student_steps, student_guidance, student_info)),
                                   ("baseline", baseline, baseline_settings)):
        if folder:
            check_sampling_steps(folder, role, [settings[0], *ev.student_steps])
    extractor: Extractor = load_extractor(ev.extractor, dev, teacher=teacher)

    loaded = load_pipeline(teacher, config.model.family, config.model.allow_pickle)
    check_teacher_of(loaded, teacher, config, [("student", student, student_info),
                                                ("baseline", baseline, baseline_settings and baseline_settings[2])])
    teacher_pipe = prepare(loaded, dev, config.model.dtype)
    resolution = config.model.resolution or teacher_pipe.unet.config.sample_size * teacher_pipe.vae_scale_factor

    ref_uri = reference_uri(config, reference)
    ref_features, ref_captions, ref_skipped = reference_features(config, ref_uri, resolution, extractor)
    prompt_list = evaluation_prompts(config, file_prompts, ref_uri, ref_captions)
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

    # the curve diagnose measured for this student, checked before any sampling; else measured below
    shift = load_diagnosis(covariate_shift, config, student, teacher, prompt_list) if covariate_shift else None
    measure_shift = shift is None and config.diagnose.in_evaluate
    setup = Setup(prompt_list, seeds, resolution, ev.batch_size, dev, extractor, wanted is not None, tmp)
    runs: list[Run] = [sample_run(teacher_pipe, "teacher", "teacher", ev.teacher_steps, teacher_guidance, None,
                                  teacher, setup)]
    if not measure_shift:
        del teacher_pipe
        free(dev)
    todo = [("student", student, (student_steps, student_guidance, student_info))]
    if baseline:
        todo.append(("baseline", baseline, baseline_settings))
    for role, folder, (steps, guidance, info) in todo:
        pipe = prepare(load_pipeline(folder, "auto", config.model.allow_pickle), dev, config.model.dtype)
        runs.append(sample_run(pipe, role, role, steps, guidance, info, folder, setup))
        if role == "student" and measure_shift:  # the covariate-shift curve (stages/diagnose.py)
            shift = measure(config, pipe, info or None, teacher_pipe, prompt_list, resolution, extractor)
            shift.pop("samples")
            del teacher_pipe
        for n in sorted({n for n in ev.student_steps if n != steps}):
            runs.append(sample_run(pipe, f"{role}@{n}", role, n, guidance, info, folder, setup))
        del pipe
        free(dev)

    # Metrics, in the order: student, student@N..., teacher, baseline, baseline@N...
    order = {"student": 0, "teacher": 1, "baseline": 2}
    runs.sort(key=lambda r: (order[r.family], r.key != r.family, r.steps))
    models: dict[str, dict] = {}
    dim = int(ref_features.shape[1])
    cross_check = bool(ev.fid_cross_check) and (dim <= CROSS_CHECK_MAX_DIM or dev.type == "cuda")
    for r in runs:
        m = {"steps": r.steps, "guidance_scale": r.guidance_scale, **({"eta": r.eta} if r.eta else {}),
             "nfe_per_image": r.nfe, "seconds_per_image": r.seconds_per_image}
        m.update(model_metrics(r.features, ref_features, len(prompt_list), len(seeds), ev.k, r.predicted, wanted,
                               cross_check))
        m["num_images"] = int(r.features.shape[0])
        models[r.key] = m
    speedup = speedups(models)
    if shift is not None:
        models["student"].update({f"covariate_{k}": v for k, v in shift["headline"].items()})

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
        "timing": f"wall seconds per image on {dev.type} in this run (text encoding, sampling and VAE decode; "
                  f"batches of {ev.batch_size}, after one untimed one-step warm-up batch per model)",
        "prompts": prompt_list,
        "prompt_source": prompts_file or ev.prompts or f"distinct captions of {ref_uri}",
        "seeds": seeds,
        "images_per_prompt": len(seeds),
        "resolution": resolution,
        "device": dev.type,
        "dtype": config.model.dtype if dev.type == "cuda" else "float32",
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
    metrics = {"protocol": protocol, "models": models, "speedup": speedup,
               **({"covariate_shift": shift} if shift is not None else {})}
    write_outputs(tmp, config, metrics, runs, extractor.name)
    write_resolved_config(tmp, config, "evaluate")
    return json_safe(metrics)
