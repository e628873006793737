"""The metric line distill and evaluate print for a hyperparameter tuner reading stdout (Katib's StdOut metrics
collector, whose default filter is `([\\w|-]+)\\s*=\\s*([+-]?\\d*(\\.\\d+)?([Ee][+-]?\\d+)?)`):

    ddil-metric step=200 watch_drift=0.0123 watch_kid=0.0041         (distill, every training.eval_every updates)
    ddil-metric steps=4 fid=12.5 coverage=0.81 adherence=0.97 teacher_fid=9.8 ...   (evaluate: metrics_flat.json)

Only finite numbers are printed, each name=value with no spaces and plain decimal or exponent notation, so Katib
reads each pair as a metric (its last value is the trial's, `docs/kubeflow.md` "Sweeping on a cluster").
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Mapping

PREFIX = "ddil-metric"
KATIB_DEFAULT_FILTER = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
_NAME = re.compile(r"[^\w-]")


def metric_line(values: Mapping[str, object], prefix: str = "") -> str:
    """`ddil-metric name=value ...` for the finite real numbers of `values` (names prefixed, odd characters as _)."""
    parts = [PREFIX]
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            continue
        number = str(int(value)) if isinstance(value, numbers.Integral) else f"{float(value):.6g}"
        parts.append(f"{_NAME.sub('_', prefix + str(name))}={number}")
    return " ".join(parts)
