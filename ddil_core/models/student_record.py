"""The one validator of a student folder's record (ddil_student.json) and its saved scheduler, called by
`ddil sample`, serve, evaluate, diagnose and register alike: a folder that one refuses, all refuse, with one line
naming the file and the key.

A record is checked for type and range (the ranges of ddil_core/config/checks.py where a config key exists), for
agreement with itself (as many trained timesteps as recommended steps; a LoRA record with its adapter file) and with
its saved scheduler (it can sample the recommended steps; a recorded eta only for a scheduler that takes one; the
recorded timesteps are the scheduler's grid at those steps).
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any, Optional

from ddil_core.config.checks import RANGES, Range
from ddil_core.models.pipeline_io import LORA_WEIGHTS, STUDENT_INFO, ModelError

MAX_RECORD_BYTES = 1 << 20  # a record is a few hundred bytes; its config section a few KB
MAX_GUIDANCE = 30.0  # the largest guidance a request may ask of `ddil serve` (serving/protocol.py Limits)
STEPS = RANGES["objective.student_steps"]
GUIDANCE = Range(RANGES["objective.guidance_scale"].low, MAX_GUIDANCE)
ETA = RANGES["objective.tdd.eta"]
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def validate_student_folder(folder, role: str = "student") -> Optional[dict]:
    """The checked ddil_student.json of a local folder (None for a folder without one, a teacher: sampled with
    DDIM). Raises ModelError naming the file, the key and the value."""
    folder = Path(str(folder))
    path = folder / STUDENT_INFO
    if not path.is_file():
        return None
    record = _read_json(path, MAX_RECORD_BYTES)
    if not isinstance(record, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(record).__name__}")
    steps = _number(path, record, "num_inference_steps", STEPS, integer=True, required=True)
    _number(path, record, "guidance_scale", GUIDANCE)
    _number(path, record, "eta", ETA)
    timesteps = record.get("timesteps")
    if timesteps is not None:
        _check_timesteps(path, timesteps, steps)
    if record.get("lora") and not (folder / LORA_WEIGHTS).is_file():
        raise ModelError(f"{path}: records a LoRA student ('lora') but {folder / LORA_WEIGHTS} is missing")
    _check_against_scheduler(folder, path, record, steps)
    return record


def scheduler_step_limit(folder) -> Optional[tuple[str, int]]:
    """(scheduler class, the most steps it can sample) of a folder's saved scheduler; None without one."""
    path = Path(str(folder)) / SCHEDULER_CONFIG
    if not path.is_file():
        return None
    cfg = _read_json(path, MAX_RECORD_BYTES)
    try:
        limit = int(cfg.get("num_train_timesteps", 1000))
        if cfg.get("_class_name") == "LCMScheduler":
            limit = min(limit, int(cfg.get("original_inference_steps") or limit))
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise ModelError(f"{path}: unreadable scheduler config ({type(exc).__name__}: {exc})") from None
    return str(cfg.get("_class_name")), limit


def check_sampling_steps(folder, role: str, steps: list[int]) -> None:
    """Refuse step counts the folder's scheduler cannot sample, before any image is made."""
    found = scheduler_step_limit(folder)
    if found is None:
        return
    name, limit = found
    for n in steps:
        if n > limit:
            raise ModelError(f"{folder}: the {role} cannot sample {n} steps (its {name} allows at most {limit})")


def _read_json(path: Path, limit: int) -> Any:
    try:
        size = path.stat().st_size
        if size > limit:
            raise ModelError(f"{path}: {size} bytes, more than the limit of {limit}")
        return json.loads(path.read_text(encoding="utf-8"))
    except ModelError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None


def _number(path: Path, record: dict, key: str, allowed: Range, integer: bool = False, required: bool = False):
    value = record.get(key)
    if value is None:
        if required:
            raise ModelError(f"{path}: '{key}' is missing")
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ModelError(f"{path}: '{key}' = {_short(value)} is not {'an integer' if integer else 'a number'}")
    if not math.isfinite(value) or not allowed.contains(value):
        raise ModelError(f"{path}: '{key}' = {_short(value)} must be {allowed.describe()}")
    return value


def _check_timesteps(path: Path, timesteps, steps: int) -> None:
    if not isinstance(timesteps, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                  for t in timesteps):
        raise ModelError(f"{path}: 'timesteps' must be a list of non-negative integers, got {_short(timesteps)}")
    if len(timesteps) != steps:
        raise ModelError(f"{path}: 'timesteps' holds {len(timesteps)} timesteps but 'num_inference_steps' is {steps}")


def _check_against_scheduler(folder: Path, path: Path, record: dict, steps: int) -> None:
    found = scheduler_step_limit(folder)
    if found is None:
        return
    name, limit = found
    if steps > limit:
        raise ModelError(f"{path}: 'num_inference_steps' = {steps}, but its {name} "
                         f"({folder / SCHEDULER_CONFIG}) samples at most {limit} steps")
    scheduler = _scheduler(folder)
    if scheduler is None:
        return
    if record.get("eta") not in (None, 0, 0.0) and "eta" not in inspect.signature(scheduler.step).parameters:
        raise ModelError(f"{path}: records 'eta' = {record['eta']} but its {name} takes no eta")
    if record.get("timesteps"):
        scheduler.set_timesteps(steps)
        grid = [int(t) for t in scheduler.timesteps.tolist()]
        if grid != list(record["timesteps"]):
            raise ModelError(f"{path}: its scheduler samples timesteps {grid} at {steps} steps, but the student was "
                             f"trained on {record['timesteps']} ('timesteps'); re-run distill to rewrite the folder")


def _scheduler(folder: Path):
    """The saved scheduler (a diffusers class), or None when diffusers does not know its class."""
    import diffusers

    cfg = json.loads((folder / SCHEDULER_CONFIG).read_text(encoding="utf-8"))
    cls = getattr(diffusers, str(cfg.get("_class_name")), None)
    if cls is None:
        return None
    try:
        return cls.from_config(cfg)
    except Exception as exc:
        raise ModelError(f"{folder / SCHEDULER_CONFIG}: unusable {cls.__name__} config ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
