"""What evaluate computes from its runs and writes: each model's metrics, the speed-ups, the gate verdict, the report
(with its side-by-side samples and the statement of which FID it is), metrics.json and metrics_flat.json."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import torch

from ddil_core.config import Config
from ddil_core.config.redaction import redacted_json
from ddil_core.metrics.diversity import mean_pairwise_distance
from ddil_core.metrics.fid import frechet_distance
from ddil_core.metrics.plots import plot_quality_vs_steps
from ddil_core.metrics.prdc import precision_recall_density_coverage
from ddil_core.metrics.report import model_label, write_report
from ddil_core.registry.gates import check_gates
from ddil_core.registry.local import json_safe
from ddil_core.stages.evaluate.inputs import adherence
from ddil_core.stages.evaluate.sampling import GRID_MAX_ROWS, STRIP_SEEDS, Run

log = logging.getLogger("ddil_core.stages.evaluate")

METRICS = "metrics.json"
METRICS_FLAT = "metrics_flat.json"
PLOT = "quality_vs_steps.png"
FLAT_KEYS = ("fid", "precision", "recall", "density", "coverage", "adherence", "diversity", "nfe_per_image",
             "seconds_per_image", "steps", "speedup_seconds", "speedup_nfe", "covariate_shift_factor_mean",
             "covariate_compounding", "covariate_drift_final", "covariate_feature_drift_final")
PREPARE_DEMO_SEEDS = "100000 + i"  # stages/prepare_demo.py EVAL_SEED_BASE: one seed per image
# What each gate of registry.gates checks (registry/gates.py), for the verdict table.
GATE_CHECKS = {"fid_factor": "student FID ≤ teacher FID × fid_factor", "min_coverage": "student coverage ≥ minimum",
               "min_adherence": "student prompt adherence ≥ minimum"}


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


def ratio(num, den) -> Optional[float]:
    try:
        num, den = float(num), float(den)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return None
    return num / den


def speedups(models: dict) -> dict:
    """Each model's speed-up over the teacher (seconds and NFE per image), written into its metrics too."""
    t = models["teacher"]
    speedup = {"reference_model": "teacher", "per_model": {}}
    for key, m in models.items():
        m["speedup_seconds"] = ratio(t["seconds_per_image"], m["seconds_per_image"])
        m["speedup_nfe"] = ratio(t["nfe_per_image"], m["nfe_per_image"])
        if key != "teacher":
            speedup["per_model"][key] = {"seconds": m["speedup_seconds"], "nfe": m["speedup_nfe"]}
    speedup["seconds"] = models["student"]["speedup_seconds"]  # teacher seconds / student seconds per image
    speedup["nfe"] = models["student"]["speedup_nfe"]  # teacher NFE / student NFE per image
    return speedup


def _write_json(path: Path, data) -> None:
    path.write_text(redacted_json(json_safe(data), indent=2, allow_nan=False) + "\n")  # no secret is ever written


def gate_verdict(metrics: dict, config: Config) -> dict:
    """registry.gates applied to these metrics, as register will apply them (registry/gates.py)."""
    gates = []
    for result in check_gates(metrics, config.registry.gates):
        gates.append({**result.to_dict(), "checks": GATE_CHECKS.get(result.name, result.name)})
    return {"passed": all(g["passed"] for g in gates), "gates": gates}


def fid_note(protocol: dict) -> str:
    """Which FID the table shows, and why another protocol gives the same teacher another number."""
    seeds, prompts = protocol["seeds"], protocol["prompts"]
    extractor = str(protocol["extractor"])
    features = "Inception-v3" if extractor == "inception" else (
        "the digit classifier's" if extractor.startswith("classifier") else f"the {extractor.split(':')[0]}")
    text = (f"FID here is the Fréchet distance between Gaussians fitted to {features} features "
            f"({protocol['feature_dim']}-d) of {len(prompts) * len(seeds)} generated images per model ({len(prompts)} "
            f"prompts × {len(seeds)} seeds, {seeds[0]} to {seeds[-1]}, the same for every prompt and every model) and "
            f"of {protocol['num_reference']} reference images ({protocol['reference']}). It ranks the models of this "
            "report against each other; with a few hundred images it carries a bias and a spread over seeds of "
            "several points, so only numbers of the same protocol compare.")
    if extractor.startswith("classifier"):
        text += (f" prepare-demo's summary.json measures the teacher in the same features against the same held-out "
                 f"digits, but with one distinct seed per image ({PREPARE_DEMO_SEEDS}), so it reports another number "
                 "for the same teacher; benchmarks/paper_table.py uses seeds 1000 to 1029 (docs/demo.md, "
                 "docs/paper-table.md). It is not the Inception FID of published results.")
    return text


def comparison(runs: list[Run], prompts: list[str], seeds: list[int]) -> dict:
    """The side-by-side table: one row per prompt shown, one column per run (teacher first), the same seeds."""
    ordered = [r for r in runs if r.family == "teacher"] + [r for r in runs if r.family != "teacher"]
    shown = seeds[:STRIP_SEEDS]
    rows = [{"prompt": prompt, "images": [r.strips[i] for r in ordered]}
            for i, prompt in enumerate(prompts[:GRID_MAX_ROWS])]
    more = f" (first {GRID_MAX_ROWS} prompts)" if len(prompts) > GRID_MAX_ROWS else ""
    return {"columns": [model_label(r.key, {"steps": r.steps}) for r in ordered], "rows": rows,
            "caption": f"Each row is one prompt{more}; each column a model; every cell shows seeds {shown[0]} to "
                       f"{shown[-1]}, so the images in a row start from the same noise."}


def write_outputs(tmp: Path, config: Config, metrics: dict, runs: list[Run], extractor_name: str) -> None:
    """report.md/.html (with the plot and the grids), metrics.json and metrics_flat.json, into the staging folder."""
    models, protocol = metrics["models"], metrics["protocol"]
    rows = [{"model": r.family, "steps": r.steps, "fid": models[r.key]["fid"]} for r in runs]
    plot = plot_quality_vs_steps(rows, tmp / PLOT, title="FID vs sampling steps "
                                 f"({extractor_name.split(':')[0]} features)").name
    shown = "" if len(protocol["prompts"]) <= GRID_MAX_ROWS else f" (first {GRID_MAX_ROWS} prompts)"
    grids = {f"{model_label(r.key, {'steps': r.steps})}, guidance {r.guidance_scale:g}{shown}": r.grid for r in runs}
    safe = json_safe(metrics)
    figures = {}
    if "covariate_shift" in metrics:
        from ddil_core.stages.diagnose import write_plots

        shift_png, handover_png = write_plots(tmp, metrics["covariate_shift"])
        figures["Covariate shift"] = {"R(k): the student's one-step error on its own states over that on the "
                                      "teacher's, and the drift D(k) from the teacher's trajectory": shift_png.name,
                                      "Hand-over: the final distance to the teacher when the teacher takes the "
                                      "first m steps": handover_png.name}
    write_report(tmp, safe, grids, plot, verdict=gate_verdict(safe, config), figures=figures,
                 comparison=comparison(runs, protocol["prompts"], protocol["seeds"]), fid_note=fid_note(protocol))
    _write_json(tmp / METRICS, metrics)
    flat = {k: v for k, v in models["student"].items() if k in FLAT_KEYS and v is not None}
    if models["teacher"].get("fid") is not None:
        flat["teacher_fid"] = models["teacher"]["fid"]
    if "baseline" in models and models["baseline"].get("fid") is not None:
        flat["baseline_fid"] = models["baseline"]["fid"]
    _write_json(tmp / METRICS_FLAT, flat)
