"""Watching a run: a cheap, fixed-noise measure of the current student against the teacher every
training.eval_every updates, the best one's checkpoint kept, and an alarm when it degrades (training.alarm).

DMD2-style training can collapse without a sign in the loss, and a student is otherwise measured only after
training. So from the same M = training.eval_num_noises noises and prompts each time, the student (its EMA weights
when there is an EMA) runs its own sampler on its current grid (the objective's `student_step`, as it ships) and the
teacher its guided DDIM over each interval of that grid (method/rollouts.py teacher_interval_step); the watch records

- drift: the mean squared latent distance between the two final samples, paired by noise (D(N) of
  metrics/covariate_shift.py);
- kid: unbiased KID (metrics/kid.py) between the student's and the teacher's final samples, on the evaluation
  classifier's features of the decoded images when there is one, else on the latents flattened, both standardised
  by the teacher's per-dimension mean and spread (the cubic kernel assumes features of order one); the teacher's
  features are cached per grid;
- shift_factor: the covariate-shift factor R (mean over the steps after the first; none at one step), the
  teacher's interval step as the reference (exact for interval samplers such as PD's DDIM; for consistency samplers,
  which re-noise, the teacher's deterministic interval is the reference);
- adherence: the classifier's accuracy on the prompted digit, when the extractor classifies and every prompt names
  a class.

Each measure is a train_log.jsonl line {"step", "eval": {...}}, handed to the stage's log callback (the Prometheus
gauges, telemetry/stage.py). The lowest value of training.alarm.metric so far is the best: its full checkpoint is
written to checkpoints/best/ (resumable like any other). When the metric exceeds factor x best + margin, or is not
finite, for `patience` measures in a row, action "stop" writes a checkpoint and raises CollapseAlarm naming both;
"warn" logs it. The measure draws from its own generators and puts the live weights back bit for bit, so a watched
run trains exactly as an unwatched one. On resume the history is read back from the (truncated) log.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ddil_core.config.redaction import redacted_json
from ddil_core.method.objectives.base import Objective
from ddil_core.metrics.covariate_shift import trajectory_errors
from ddil_core.metrics.kid import kid, standardiser
from ddil_core.models.conditioning import Cond, index_cond
from ddil_core.telemetry.metric_line import metric_line
from ddil_core.models.trainable import load_trainable_state, trainable_state_dict
from ddil_core.training.checkpoint import latest_checkpoint
from ddil_core.training.loop import NonFiniteLoss

log = logging.getLogger(__name__)
WATCHED = ("drift", "kid", "shift_factor", "adherence")
BEST = "best"  # checkpoints/best/step-NNNNNNN: the best measured state


class CollapseAlarm(NonFiniteLoss):
    """The watched measure degraded past training.alarm's threshold: stopped with a checkpoint (exit 1)."""


@dataclass
class Probe:
    """What the watch measures with, fixed for the whole run (built by the distill stage)."""

    noise: torch.Tensor  # [M, C, H, W]
    cond: Cond  # [M, ...]
    teacher_step: Callable  # step(x, grid, k, cond): the teacher over interval k of `grid`
    features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # final latents -> [M, D]; None: flattened
    classify: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # final latents -> predicted classes [M]
    wanted: Optional[list[int]] = None  # the class each row's prompt asks for
    seed: int = 0


@contextlib.contextmanager
def ema_weights(module: torch.nn.Module, ema):
    """The EMA's weights in `module` for the duration; the live ones put back exactly after."""
    if ema is None:
        yield
        return
    live = {k: v.detach().clone() for k, v in trainable_state_dict(module).items()}
    ema.copy_to(module)
    try:
        yield
    finally:
        load_trainable_state(module, live)


def measure(objective: Objective, ema, probe: Probe, teacher_cache: Optional[dict] = None) -> dict:
    """The watch's measures of the objective's current student (see the module docstring)."""
    grid = objective.grid()
    n = grid.num_steps
    student = objective.trainable()["student"]

    def student_step(x, k, rows):  # a stochastic sampler draws the same noise at step k every time
        return objective.student_step(x, k, index_cond(probe.cond, rows),
                                      torch.Generator().manual_seed(probe.seed * 1009 + k))

    def reference(x, k, rows):
        return probe.teacher_step(x, grid, k, index_cond(probe.cond, rows))

    with ema_weights(student, ema), torch.no_grad():
        samples, x_s, x_t = trajectory_errors(student_step, reference, probe.noise, n)
    features = probe.features or (lambda x: x.flatten(1).double().cpu())
    cache = teacher_cache if teacher_cache is not None else {}
    key = tuple(grid.steps)
    if key not in cache:  # the teacher's features, and the standardisation both sets are measured in
        f_t = features(x_t)
        cache[key] = (f_t, standardiser(f_t))
    f_t, standardise = cache[key]
    f_s = features(x_s)
    finite = bool(torch.isfinite(x_s).all()) and bool(torch.isfinite(f_s).all())
    out = {"student_steps": n, "num_noises": int(probe.noise.shape[0]),
           "drift": float(np.mean(samples.drift_final)) if finite else math.inf,
           "kid": kid(standardise(f_s), standardise(f_t)) if finite else math.inf}
    ratios = [samples.e_student[:, k].mean() / samples.e_teacher[:, k].mean() for k in range(1, n)
              if samples.e_teacher[:, k].mean() > 0]
    out["shift_factor"] = float(np.mean(ratios)) if ratios and finite else (math.inf if not finite else None)
    if probe.classify is not None and probe.wanted is not None and finite:
        predicted = probe.classify(x_s).long().cpu()
        out["adherence"] = float((predicted == torch.as_tensor(probe.wanted)).double().mean())
    return out


class Watch:
    def __init__(self, config, objective: Objective, ema, probe: Probe):
        self.every = config.training.eval_every
        self.alarm = config.training.alarm
        self.objective, self.ema, self.probe = objective, ema, probe
        self.teacher_cache: dict = {}
        self.history: Optional[list[dict]] = None  # [{"step", "eval"}] of this run so far

    def after_update(self, trainer) -> None:
        """The loop's hook, once per update."""
        if self.every and trainer.step % self.every == 0:
            self.evaluate(trainer)

    def best(self) -> Optional[dict]:
        metric = self.alarm.metric
        scored = [r for r in self.history or [] if _finite(r["eval"].get(metric))]
        return min(scored, key=lambda r: r["eval"][metric]) if scored else None

    def evaluate(self, trainer) -> dict:
        if self.history is None:
            self.history = _read_history(trainer.log_path, trainer.step)
        metric, alarm = self.alarm.metric, self.alarm
        best = self.best()
        values = measure(self.objective, self.ema, self.probe, self.teacher_cache)
        value = values.get(metric)
        improved = _finite(value) and (best is None or value < best["eval"][metric])
        degraded = value is not None and (not _finite(value) or (
            best is not None and value > alarm.factor * best["eval"][metric] + alarm.margin))
        values["degraded"] = bool(degraded)
        if improved:
            trainer.save(root=trainer.ckpt_dir / BEST, keep=1)
            values["best"] = True
        record = {"step": trainer.step, "eval": values}
        self.history.append(record)
        if trainer.is_main:
            with open(trainer.log_path, "a") as f:
                f.write(redacted_json(record) + "\n")
        if trainer.on_log is not None:
            trainer.on_log(record)
        if trainer.is_main:  # for a tuner reading stdout (Katib): telemetry/metric_line.py
            print(metric_line({"step": trainer.step, **{k: values.get(k) for k in WATCHED}}, "watch_"), flush=True)
        streak = 0
        for r in reversed(self.history):
            if not r["eval"].get("degraded"):
                break
            streak += 1
        if degraded and streak >= alarm.patience and alarm.action != "off":
            best = self.best()
            where = (f"best {metric} {best['eval'][metric]:.4g} at step {best['step']}, its checkpoint in "
                     f"{trainer.ckpt_dir / BEST}") if best else "no finite measure yet"
            message = (f"training.alarm: {metric} = {value:.4g} at step {trainer.step} is past "
                       f"{alarm.factor:g} x its best + {alarm.margin:g} ({where})")
            if alarm.action == "warn":
                log.warning("%s; training goes on (training.alarm.action = warn)", message)
            else:
                newest = latest_checkpoint(trainer.ckpt_dir)
                if newest is None or not newest.name.endswith(f"{trainer.step:07d}"):
                    trainer.save()
                raise CollapseAlarm(f"{message}; stopped with a checkpoint at step {trainer.step}: lower training.lr, "
                                    "or resume from the best checkpoint (copy it into checkpoints/)")
        return values


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _read_history(log_path: Path, step: int) -> list[dict]:
    """The eval records of a resumed run (the log was truncated to its checkpoint's step)."""
    if not Path(log_path).exists():
        return []
    out = []
    for line in Path(log_path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "eval" in record and record.get("step", 0) <= step:
            out.append(record)
    return out
