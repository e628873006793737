"""Paired comparisons of two training arms over seeds: the per-seed differences, their mean with a 95% t-interval,
an exact sign-flip permutation p (no normality assumed), Holm's correction over a family of comparisons, and the
smallest effect the design could detect (80% power at two-sided 5%)."""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
from scipy import stats

ALPHA, POWER = 0.05, 0.8
EXACT_UP_TO = 16  # seeds: all 2^n sign patterns (65,536); beyond, 100,000 random ones


def sign_flip_p(diffs: Sequence[float], seed: int = 0) -> float:
    """Two-sided p of "the mean difference is 0" under random sign flips of the paired differences."""
    d = np.asarray(diffs, dtype=np.float64)
    observed = abs(d.mean())
    if len(d) <= EXACT_UP_TO:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(100_000, len(d)))
    flipped = np.abs((signs * d).mean(axis=1))
    return float((flipped >= observed - 1e-12).mean())


def paired(treatment: Sequence[float], control: Sequence[float]) -> dict:
    """treatment - control, seed by seed (the same seeds, in the same order)."""
    if len(treatment) != len(control):
        raise ValueError(f"paired arms need the same seeds: {len(treatment)} against {len(control)} values")
    d = np.asarray(treatment, dtype=np.float64) - np.asarray(control, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    out = {"n": n, "mean_difference": mean, "differences": d.tolist()}
    if n < 2:
        return {**out, "ci95": None, "p_sign_flip": None, "detectable_effect": None}
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    t = float(stats.t.ppf(1 - ALPHA / 2, n - 1))
    return {**out, "sd": sd, "ci95": [mean - t * se, mean + t * se], "p_sign_flip": sign_flip_p(d),
            "detectable_effect": (t + float(stats.t.ppf(POWER, n - 1))) * se}


def holm(pvalues: dict) -> dict:
    """Holm-adjusted p per key (step-down over the family, monotone, capped at 1)."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    adjusted, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[key]))
        adjusted[key] = running
    return adjusted
