"""Stage register: put the student in the model registry when its evaluation clears the quality gates.

Reads the metrics.json written by `evaluate`, checks `registry.gates` and registers the student (local registry
folder by default; the Kubeflow Model Registry when `registry.kubeflow_address` is set) with a model card. A failed
gate raises `GateError` naming every failed gate (the CLI exits 3) and nothing is written.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

from ddil_core.config import Config
from ddil_core.data.datasets import DatasetError
from ddil_core.registry import GateError, register_student
from ddil_core.telemetry.settings import stage_telemetry

log = logging.getLogger(__name__)

GATED_METRICS = ("fid", "coverage", "adherence")  # the metrics registry/gates.py judges

__all__ = ["GateError", "MetricsError", "read_metrics", "register"]


class MetricsError(DatasetError):
    """metrics.json is unreadable or not the evaluate stage's layout; the message names the file (bad input)."""


def read_metrics(path: str | Path) -> dict:
    """The evaluate stage's metrics.json: {"protocol": ..., "models": {"student": {...}, ...}, ...}."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"  # an evaluate output folder is accepted too
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetricsError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise MetricsError(f"{path}: unreadable ({exc})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("models"), dict):
        raise MetricsError(f"{path}: not an evaluate metrics file (expected a 'models' mapping with the student's "
                           "metrics)")
    bad = [name for name, entry in metrics["models"].items() if not isinstance(entry, dict)]
    if "student" not in metrics["models"] or bad:
        raise MetricsError(f"{path}: not an evaluate metrics file (models.{bad[0] if bad else 'student'} must be a "
                           "mapping of metric names to values)")
    if not isinstance(metrics.get("protocol", {}), dict):
        raise MetricsError(f"{path}: not an evaluate metrics file ('protocol' must be a mapping)")
    check_metric_values(metrics, path)
    return metrics


def check_metric_values(metrics: dict, path: Path) -> None:
    """A gate judges only well-formed metrics (exit 3): a gated metric that is present must be a finite number
    (evaluate writes null for one it could not compute); anything else is a malformed file (exit 2)."""
    for model, entry in metrics["models"].items():
        for key in GATED_METRICS:
            value = entry.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise MetricsError(f"{path}: models.{model}.{key} = {str(value)[:40]!r} is not a finite number "
                                   "(evaluate writes a number or null)")


def register(config: Config, student: str, metrics_path: str | Path, registry: Optional[str] = None,
             model_uri: Optional[str] = None) -> dict:
    """Check that the inputs belong together, gate, then register; returns the registry entry ({"name", "version",
    "path", ...}). `model_uri`: where the same student is stored for serving (a KFP artifact URI), when `student` is a
    local copy.

    Raises FileNotFoundError / MetricsError for a missing or bad metrics file, ModelError when the student folder is
    unusable or the metrics were made for another student, ConfigError when the config is not the one that made the
    student (its model card would mislabel it), and GateError when a gate fails.
    """
    from ddil_core.config import ConfigError
    from ddil_core.models.pipeline_io import ModelError, check_model_folder
    from ddil_core.registry.local import NAME_PATTERN
    from ddil_core.stages.provenance import check_config_of, check_metrics_belong, student_info

    if not NAME_PATTERN.match(config.registry.model_name or ""):
        raise ConfigError(f"registry.model_name = {config.registry.model_name!r} must be 1-128 letters, digits, '.', "
                          "'_' or '-', starting with a letter or digit")
    target = registry or config.registry.uri
    if not config.registry.kubeflow_address and "://" not in str(target) and "://" not in str(student):
        mine, theirs = Path(target).resolve(), Path(student).resolve()
        if mine == theirs or theirs in mine.parents:
            raise ModelError(f"--registry {target} lies inside the student folder {student}; registering would "
                             "change the student it registers")
    # pushed like every stage (ddil_stage_success 0 when a check, a gate or the registry refuses)
    with stage_telemetry(config, "register", Path(registry or config.registry.uri or "registry")):
        metrics = read_metrics(metrics_path)
        if "://" not in str(student):
            if not Path(student).is_dir():
                raise ModelError(f"student not found: {student} (a student folder written by distill)")
            check_model_folder(Path(student), config.model.allow_pickle)
        info = student_info(student) if Path(str(student)).is_dir() else None  # the validator sample/serve use
        check_metrics_belong(metrics, Path(metrics_path), str(student))
        check_config_of(config, str(student), info)
        entry = register_student(config, str(student), metrics, registry, model_uri=model_uri)
    log.info("registered %s version %s", entry.get("name"), entry.get("version"))
    return entry
