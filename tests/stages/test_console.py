"""What a user sees on the console of each stage, run as `ddil` subprocesses with stderr a pipe (not a terminal):
progress lines of the long loops (step, loss, ETA), one line saying the thread count, and none of the libraries'
notices that are not the user's business (torchvision, the safety checker, per-file loading bars)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests import ROOT

NOISE = ("torchvision", "safety checker", "safety_checker", "Loading pipeline components", "Loading weights",
         "Writing model shards")


def _ddil(*args, env_extra=None, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DDIL_PROGRESS_EVERY_S": "0", **(env_extra or {})}
    env.pop("DDIL_PUSHGATEWAY", None)
    proc = subprocess.run([sys.executable, "-m", "ddil_core.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"ddil {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def _quiet(proc: subprocess.CompletedProcess, command: str) -> None:
    text = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise not in text, f"ddil {command} printed {noise!r}:\n{text[-2000:]}"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The tiny recipe through every stage, each command's output kept."""
    root = tmp_path_factory.mktemp("console")
    runs = {}
    runs["cache-latents"] = _ddil("cache-latents", "--config", "tiny", "--out", root / "latents")
    runs["teacher-rollouts"] = _ddil("teacher-rollouts", "--config", "tiny", "--latents", root / "latents",
                                     "--out", root / "rollouts")
    runs["distill"] = _ddil("distill", "--config", "tiny", "--latents", root / "latents", "--rollouts",
                            root / "rollouts", "--out", root / "distill")
    runs["evaluate"] = _ddil("evaluate", "--config", "tiny", "--student", root / "distill" / "student", "--out",
                             root / "evaluate", "--set", "evaluation.teacher_steps=2",
                             "--set", "evaluation.fid_cross_check=false")
    runs["register"] = _ddil("register", "--config", "tiny", "--student", root / "distill" / "student",
                             "--metrics", root / "evaluate" / "metrics.json", "--registry", root / "registry")
    runs["sample"] = _ddil("sample", "--model", root / "distill" / "student", "--prompt", "a handwritten digit one",
                           "--out", root / "one.png")
    return runs


def test_distill_prints_progress_lines_with_step_loss_and_eta_off_a_terminal(chain):
    """training.steps = 6 in the tiny recipe, and DDIL_PROGRESS_EVERY_S=0: a line at every step."""
    lines = [line for line in chain["distill"].stderr.splitlines() if "ddil_core.progress: distill: step" in line]
    pattern = re.compile(r"distill: step (\d+)/6 \((\d+)%\), +[\d.]+(?:step/s|s/step), elapsed \d\d:\d\d, "
                         r"eta \d\d:\d\d, loss (\d[\d.e+-]*)$")
    matches = [pattern.search(line) for line in lines]
    assert all(matches) and len(matches) == 6, lines
    assert [int(m.group(1)) for m in matches] == [1, 2, 3, 4, 5, 6]
    assert all(float(m.group(3)) > 0 for m in matches)
    assert "\r" not in chain["distill"].stderr  # no bar drawn into a log


def test_the_long_loops_of_the_other_stages_report_progress_too(chain):
    assert re.search(r"cache-latents: image 64/64 \(100%\)", chain["cache-latents"].stderr)  # data.limit 64
    assert re.search(r"teacher-rollouts: rollout 16/16 \(100%\)", chain["teacher-rollouts"].stderr)
    assert re.search(r"evaluate: teacher at 2 steps: image 8/8 \(100%\)", chain["evaluate"].stderr)
    assert re.search(r"evaluate: student at 2 steps: image 8/8 \(100%\)", chain["evaluate"].stderr)


def test_no_library_noise_reaches_the_console_of_any_stage(chain):
    for command, proc in chain.items():
        _quiet(proc, command)


def test_the_thread_count_is_chosen_and_said_once(chain):
    for command, proc in chain.items():
        said = [line for line in proc.stderr.splitlines() if "ddil_core: torch: " in line]
        assert len(said) == (0 if command == "register" else 1), (command, said)
        if said:
            assert "CPU thread" in said[0] and "OMP_NUM_THREADS" in said[0]


def test_without_omp_num_threads_half_the_cores_are_used(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = ("from ddil_core.console import choose_threads, usable_cores; import torch; line = choose_threads(); "
            "print(torch.get_num_threads(), usable_cores(), line)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "PYTHONPATH": str(ROOT)}).stdout.split(" ", 2)
    threads, cores, line = int(out[0]), int(out[1]), out[2]
    assert threads == max(1, cores // 2) and f"torch: {threads} CPU thread" in line and f"of {cores} cores" in line


def test_prepare_demo_is_quiet_and_ends_with_one_short_line(tmp_path):
    proc = _ddil("prepare-demo", "--config", "demo", "--set", "demo.vae_steps=3", "--set", "demo.classifier_steps=3",
                 "--set", "demo.teacher_steps=3", "--set", "demo.eval_steps=2", "--set", "demo.eval_few_steps=[1]",
                 "--set", "demo.eval_images_per_digit=1", "--out", tmp_path / "demo")
    _quiet(proc, "prepare-demo")
    out = proc.stdout.strip().splitlines()
    assert len(out) == 1 and len(out[0]) < 300 and "summary.json" in out[0], out
    for phase in ("classifier", "vae", "teacher"):
        assert re.search(rf"prepare-demo: {phase}: step 3/3 \(100%\)", proc.stderr), phase
