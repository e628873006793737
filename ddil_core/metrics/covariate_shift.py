"""The covariate-shift curve of a few-step student against its teacher (docs/method.md, "Measuring covariate shift").

For M noises z, the teacher trajectory x^T_k and the student trajectory x^S_k on the student's grid, both from z:

    x^T_{k+1} = Phi_k(x^T_k)          the teacher's version of step k (its reference step)
    x^S_{k+1} = S_k(x^S_k)            the student's own step k, as it samples
    e_T(k) = |S_k(x^T_k) - Phi_k(x^T_k)|^2     one student step on the teacher's state
    e_S(k) = |S_k(x^S_k) - Phi_k(x^S_k)|^2     one student step on its own state
    R(k) = mean e_S(k) / mean e_T(k)           the covariate-shift factor (1: no shift); R(0) = 1 exactly
    D(k) = |x^S_k - x^T_k|^2                   drift; D(0) = 0 exactly
    C = mean D(N) / sum_k mean e_S(k)          errors that add (about 1) or compound (well above 1)
    H(m) = |x^{m}_N - x^T_N|^2                 hand-over: the teacher takes the first m steps, the student the rest

Squared distances are per element (mean over a state's elements), so they compare across latent sizes. Every
quantity is paired by z: the intervals are percentile bootstraps over the noises (ratios of means resampled whole).
Pure tensors: the steps are callables `step(x, k, rows) -> x_next`, where `rows` indexes the noises of the batch
(a stochastic sampler draws the same fixed noise for a row at step k wherever it is applied).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

Step = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
CONFIDENCE = 0.95


def _sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per row."""
    return (a.double() - b.double()).pow(2).flatten(1).mean(1)


@dataclass
class ShiftSamples:
    """Per-noise values: e_T, e_S, drift [M, N] (drift[:, k] at the input of step k; drift_final after the last
    step), handover [M, N + 1] (m = 0..N teacher steps)."""

    e_teacher: np.ndarray
    e_student: np.ndarray
    drift: np.ndarray
    drift_final: np.ndarray
    handover: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.e_teacher.shape[1])


@torch.no_grad()
def trajectory_errors(student_step: Step, reference_step: Step, z: torch.Tensor, num_steps: int,
                      rows: Optional[torch.Tensor] = None) -> tuple[ShiftSamples, torch.Tensor, torch.Tensor]:
    """(per-noise values, the student's final states, the teacher's final states) of one batch of noises z."""
    rows = torch.arange(z.shape[0]) if rows is None else rows
    n = num_steps
    e_t, e_s, drift = (np.zeros((z.shape[0], n)) for _ in range(3))
    x_t, x_s = z, z
    teacher_states = []
    for k in range(n):
        teacher_states.append(x_t)
        drift[:, k] = _sq(x_s, x_t).cpu().numpy()
        ref_t = reference_step(x_t, k, rows)
        e_t[:, k] = _sq(student_step(x_t, k, rows), ref_t).cpu().numpy()
        next_s = student_step(x_s, k, rows)
        e_s[:, k] = _sq(next_s, reference_step(x_s, k, rows)).cpu().numpy()
        x_t, x_s = ref_t, next_s
    handover = np.zeros((z.shape[0], n + 1))
    for m in range(n + 1):  # m = n is the teacher's own trajectory: 0 by construction
        x = teacher_states[m] if m < n else x_t
        for k in range(m, n):
            x = student_step(x, k, rows)
        handover[:, m] = _sq(x, x_t).cpu().numpy()
    samples = ShiftSamples(e_t, e_s, drift, _sq(x_s, x_t).cpu().numpy(), handover)
    return samples, x_s, x_t


def concat(parts: list[ShiftSamples]) -> ShiftSamples:
    return ShiftSamples(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                          ("e_teacher", "e_student", "drift", "drift_final", "handover")))


def _ratio(num: np.ndarray, den: np.ndarray) -> Optional[float]:
    den_mean = float(np.mean(den))
    return float(np.mean(num)) / den_mean if den_mean > 0 else None


def _interval(values: np.ndarray, statistic: Callable[[np.ndarray], Optional[float]], resamples: np.ndarray):
    """The statistic on the rows, with a percentile bootstrap interval over resampled rows (paired by noise)."""
    point = statistic(values)
    boot = [statistic(values[idx]) for idx in resamples]
    boot = np.array([b for b in boot if b is not None])
    if point is None or not len(boot):
        return {"value": point, "low": None, "high": None}
    low, high = np.quantile(boot, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return {"value": point, "low": float(low), "high": float(high)}


def summarize(s: ShiftSamples, bootstrap: int = 1000, seed: int = 0, feature_drift: Optional[np.ndarray] = None
              ) -> dict:
    """The curves with 95% intervals: e_T(k), e_S(k), R(k), D(k) (k = 0..N, D(N) the final drift), C, H(m), and
    the final drift in feature space when given; JSON-ready."""
    m, n = s.e_teacher.shape
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, m, size=(bootstrap, m))
    joined = np.concatenate([s.e_teacher, s.e_student, s.drift, s.drift_final[:, None], s.handover], axis=1)
    e_t, e_s = slice(0, n), slice(n, 2 * n)
    drift = slice(2 * n, 3 * n + 1)
    hand = slice(3 * n + 1, 4 * n + 2)

    def column(c):
        return lambda v: float(np.mean(v[:, c]))

    out = {
        "num_noises": int(m),
        "num_steps": int(n),
        "confidence": CONFIDENCE,
        "interval": f"percentile bootstrap over the {m} noises ({bootstrap} resamples, paired by noise)",
        "e_teacher": [_interval(joined, column(e_t.start + k), resamples) for k in range(n)],
        "e_student": [_interval(joined, column(e_s.start + k), resamples) for k in range(n)],
        "shift_factor": [_interval(joined, lambda v, k=k: _ratio(v[:, e_s.start + k], v[:, e_t.start + k]),
                                   resamples) for k in range(n)],
        "drift": [_interval(joined, column(drift.start + k), resamples) for k in range(n + 1)],
        "compounding": _interval(joined, lambda v: _ratio(v[:, drift.stop - 1], v[:, e_s].sum(1)), resamples),
        "handover": [_interval(joined, column(hand.start + j), resamples) for j in range(n + 1)],
    }
    if feature_drift is not None:
        out["feature_drift_final"] = _interval(feature_drift[:, None], column(0), resamples)
    return out


def headline(summary: dict) -> dict:
    """The scalars a dashboard tracks: mean R over the steps after the first, C, final drift."""
    later = [r["value"] for r in summary["shift_factor"][1:] if r["value"] is not None]
    return {"shift_factor_mean": float(np.mean(later)) if later else None,
            "compounding": summary["compounding"]["value"],
            "drift_final": summary["drift"][-1]["value"],
            **({"feature_drift_final": summary["feature_drift_final"]["value"]}
               if "feature_drift_final" in summary else {})}
