"""Quality gates: a student is registered only when its evaluation clears every configured gate.

The metrics are those of the evaluate stage (metrics.json):
`{"protocol": {...}, "models": {"student": {"fid": ..., "coverage": ..., "adherence": ...}, "teacher": {...}}}`.

| gate          | passes when                                        |
|---------------|----------------------------------------------------|
| fid_factor    | student fid <= teacher fid * fid_factor            |
| min_coverage  | student coverage >= min_coverage                   |
| min_adherence | student adherence >= min_adherence                 |

A gate set to None is off. A gate whose metric is missing (or null, or not a finite number) fails, and its
message names the missing key, e.g. `models.student.coverage`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from ddil_core.config.schema import GatesConfig


@dataclass
class GateResult:
    name: str  # the GatesConfig field: fid_factor, min_coverage, min_adherence
    passed: bool
    actual: Optional[float]  # the student's value (None when missing)
    threshold: Optional[float]  # the value it was compared with (None when it could not be computed)
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


class _Missing(Exception):
    def __init__(self, key: str, why: str):
        super().__init__(key)
        self.key = key
        self.why = why


def _metric(metrics: dict, model: str, key: str) -> float:
    """metrics['models'][model][key] as a finite float, or _Missing naming the dotted key."""
    dotted = f"models.{model}.{key}"
    node: Any = metrics
    for part in ("models", model, key):
        if not isinstance(node, dict) or part not in node:
            raise _Missing(dotted, "is missing from the metrics")
        node = node[part]
    if node is None:
        raise _Missing(dotted, "is null in the metrics")
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise _Missing(dotted, f"is not a number ({node!r})")
    value = float(node)
    if not math.isfinite(value):
        raise _Missing(dotted, f"is not finite ({value})")
    return value


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _fid_gate(metrics: dict, factor: float) -> GateResult:
    name = "fid_factor"
    try:
        student = _metric(metrics, "student", "fid")
    except _Missing as exc:
        return GateResult(name, False, None, None, f"gate {name}: metric '{exc.key}' {exc.why}")
    try:
        teacher = _metric(metrics, "teacher", "fid")
    except _Missing as exc:
        return GateResult(name, False, student, None, f"gate {name}: metric '{exc.key}' {exc.why}")
    threshold = teacher * factor
    passed = student <= threshold
    op = "<=" if passed else ">"
    return GateResult(
        name,
        passed,
        student,
        threshold,
        f"gate {name}: student fid {_fmt(student)} {op} threshold {_fmt(threshold)} "
        f"(teacher fid {_fmt(teacher)} x {factor:g})",
    )


def _min_gate(metrics: dict, name: str, key: str, minimum: float) -> GateResult:
    try:
        actual = _metric(metrics, "student", key)
    except _Missing as exc:
        return GateResult(
            name, False, None, float(minimum), f"gate {name}: metric '{exc.key}' {exc.why} (threshold {minimum:g})"
        )
    passed = actual >= minimum
    op = ">=" if passed else "<"
    return GateResult(
        name, passed, actual, float(minimum), f"gate {name}: student {key} {_fmt(actual)} {op} threshold {minimum:g}"
    )


def check_gates(metrics: dict, gates: GatesConfig) -> list[GateResult]:
    """Evaluate every enabled gate; gates set to None are skipped (not reported)."""
    if not isinstance(metrics, dict):
        metrics = {}
    results: list[GateResult] = []
    if gates.fid_factor is not None:
        results.append(_fid_gate(metrics, float(gates.fid_factor)))
    if gates.min_coverage is not None:
        results.append(_min_gate(metrics, "min_coverage", "coverage", float(gates.min_coverage)))
    if gates.min_adherence is not None:
        results.append(_min_gate(metrics, "min_adherence", "adherence", float(gates.min_adherence)))
    return results


def failed(results: list[GateResult]) -> list[GateResult]:
    """The results that did not pass."""
    return [r for r in results if not r.passed]
