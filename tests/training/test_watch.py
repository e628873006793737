"""Watching a run (training/watch.py): the in-training measure, the best checkpoint, the collapse alarm; and the
unbiased KID (metrics/kid.py) against a direct re-implementation. Real tiny models, real training."""
import json
import math

import pytest
import torch

from ddil_core.metrics.kid import kid
from ddil_core.stages.distill import distill
from tests import ROOT
from tests.conftest import tiny_config


def _kid_loops(x, y):
    """Binkowski et al. 2018, eq. 4, written out with loops: k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]

    def k(a, b):
        return (float(a.double() @ b.double()) / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_the_formula_and_separates_distributions():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g), torch.randn(9, 5, generator=g) + 0.5
    assert kid(x, y) == pytest.approx(_kid_loops(x, y), rel=1e-9)
    same = [kid(torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g)) for _ in range(3)]
    far = kid(torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g) + 2.0)
    assert far > 10 * max(abs(v) for v in same)
    with pytest.raises(ValueError):
        kid(x[:1], y)


def _log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_a_watched_run_logs_the_measure_and_keeps_the_best_checkpoint(tiny_data, tmp_path):
    latents, rollouts = tiny_data["sd15"]
    run = tmp_path / "run"
    distill(tiny_config("sd15", "training.eval_every=2", "training.eval_num_noises=8", "training.ema.enabled=true",
                        "training.ema.decay=0.5"), latents, [rollouts], run)
    evals = [r for r in _log(run) if "eval" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    for r in evals:
        assert {"drift", "kid", "shift_factor", "student_steps"} <= set(r["eval"]) and r["eval"]["num_noises"] == 8
        assert math.isfinite(r["eval"]["drift"]) and math.isfinite(r["eval"]["kid"])
    assert evals[0]["eval"]["best"]  # the first measure is the best so far
    best = min(evals, key=lambda r: r["eval"]["drift"])
    kept = sorted(p.name for p in (run / "checkpoints" / "best").iterdir())
    assert kept == [f"step-{best['step']:07d}"]
    assert [r["step"] for r in _log(run) if "loss" in r] == list(range(1, 7))  # the loss lines are untouched


def test_a_watched_run_trains_exactly_as_an_unwatched_one(tiny_data, tmp_path):
    from tests.stages.test_stages import _weights

    latents, rollouts = tiny_data["sd15"]
    plain = _weights(distill(tiny_config("sd15"), latents, [rollouts], tmp_path / "plain").parent)
    watched = _weights(distill(tiny_config("sd15", "training.eval_every=1"), latents, [rollouts],
                               tmp_path / "watched").parent)
    assert all(torch.equal(plain[k], watched[k]) for k in plain)


def test_a_learning_rate_that_blows_the_student_up_trips_the_alarm(tiny_data, tmp_path):
    from ddil_core.training.watch import CollapseAlarm

    latents, rollouts = tiny_data["sd15"]
    run = tmp_path / "run"
    config = tiny_config("sd15", "training.lr=1.0", "training.grad_clip=0", "training.steps=12",
                         "training.eval_every=2", "training.alarm.factor=2")
    with pytest.raises(CollapseAlarm, match=r"training.alarm: drift = .* at step (\d+) .*best drift .* at step 0"):
        distill(config, latents, [rollouts], run)
    evals = [r for r in _log(run) if "eval" in r]
    assert evals[-1]["step"] < 12 and evals[-1]["eval"]["degraded"]  # stopped before the run's end
    assert not (run / "student").exists()
    assert (run / "checkpoints" / "best" / "step-0000000").is_dir()  # the best: the teacher-initialised student
    assert (run / "checkpoints" / f"step-{evals[-1]['step']:07d}").is_dir()  # and where it stopped


def test_the_alarm_can_only_warn(tiny_data, tmp_path, caplog):
    from ddil_core.stages.distill.stage import BrokenStudent

    latents, rollouts = tiny_data["sd15"]
    config = tiny_config("sd15", "training.lr=1.0", "training.grad_clip=0", "training.steps=12",
                         "training.eval_every=2", "training.alarm.factor=2", "training.alarm.action=warn")
    with pytest.raises(BrokenStudent):  # it trains to the end; the end-of-run check still refuses the broken student
        distill(config, latents, [rollouts], tmp_path / "run")
    assert "training.alarm: drift" in caplog.text and "training goes on" in caplog.text
    assert [r["step"] for r in _log(tmp_path / "run") if "eval" in r][-1] == 12


def test_the_metric_line_is_what_katibs_default_stdout_filter_reads():
    import re

    from ddil_core.telemetry.metric_line import KATIB_DEFAULT_FILTER, metric_line

    line = metric_line({"step": 200, "drift": 0.0123, "kid": -1.5e-07, "shift_factor": None, "bad": math.inf,
                        "flag": True, "adherence": 1.0}, "watch_")
    assert line.startswith("ddil-metric ")
    found = {m.group(1): float(m.group(2)) for m in re.finditer(KATIB_DEFAULT_FILTER, line)}
    assert found == {"watch_step": 200, "watch_drift": 0.0123, "watch_kid": -1.5e-07, "watch_adherence": 1.0}


def test_a_watched_distill_prints_the_metric_line(tiny_data, tmp_path):
    """`ddil distill` in its own process, as a tuner (Katib's stdout collector) reads it."""
    import os
    import subprocess
    import sys

    latents, rollouts = tiny_data["sd15"]
    proc = subprocess.run([sys.executable, "-m", "ddil_core.cli", "distill", "--config", "tiny",
                           "--set", "model.teacher=tiny://sd15", "--set", "training.eval_every=3",
                           "--set", "training.eval_num_noises=4", "--latents", str(latents), "--rollouts",
                           str(rollouts), "--out", str(tmp_path / "run")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ddil-metric ")]
    assert [line.split()[1] for line in lines] == ["watch_step=0", "watch_step=3", "watch_step=6"]
    assert all("watch_drift=" in line and "watch_kid=" in line for line in lines)