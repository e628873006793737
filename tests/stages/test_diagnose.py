"""The covariate-shift measurement (metrics/covariate_shift.py, method/teacher_reference.py, stages/diagnose.py):
its identities on toy steps and on real tiny models, `ddil diagnose` through the CLI, and the curve in evaluate's
metrics.json and report."""
import json
import math

import numpy as np
import pytest
import torch

from ddil_core.cli import main
from ddil_core.metrics.covariate_shift import summarize, trajectory_errors
from tests.conftest import tiny_config

PROMPTS = ["a handwritten digit two", "a handwritten digit five"]


def _toy(z: torch.Tensor, shift: float):
    """A teacher that stays where it is (reference x -> x: its trajectory from z is z) and a student that errs by 0.1
    a step plus `shift` times its distance from the teacher's state: off the teacher's states its error grows."""
    def reference(x, k, rows):
        return x

    def student(x, k, rows):
        return x + 0.1 + shift * (x - z[rows])

    return student, reference


def test_r0_is_one_and_d0_is_zero_exactly_and_a_student_off_the_teacher_states_compounds():
    z = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    student, reference = _toy(z, shift=0.5)
    samples, x_s, x_t = trajectory_errors(student, reference, z, 4)
    summary = summarize(samples, bootstrap=200)
    assert summary["shift_factor"][0]["value"] == 1.0  # same state at k = 0: the same error
    assert summary["drift"][0]["value"] == 0.0
    # drift d_(k+1) = 1.5 d_k + 0.1: e_S(k) = (0.1 + 0.5 d_k)^2 against e_T = 0.01; D(4) = 0.8125^2
    expected_r = [(0.1 + 0.5 * d) ** 2 / 0.01 for d in (0.0, 0.1, 0.25, 0.475)]
    assert [r["value"] for r in summary["shift_factor"]] == pytest.approx(expected_r, rel=1e-5)
    assert summary["compounding"]["value"] == pytest.approx(0.8125 ** 2 / (sum(expected_r) * 0.01), rel=1e-5)
    assert summary["compounding"]["value"] > 3  # errors that compound, not add
    assert summary["handover"][-1]["value"] == 0.0 and summary["handover"][0]["value"] == summary["drift"][-1]["value"]
    for r in summary["shift_factor"][1:]:
        assert r["low"] <= r["value"] <= r["high"]


def test_a_student_that_makes_the_same_error_everywhere_has_no_shift():
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    student, reference = _toy(z, shift=0.0)
    summary = summarize(trajectory_errors(student, reference, z, 3)[0], bootstrap=100)
    assert all(math.isclose(r["value"], 1.0, rel_tol=1e-9) for r in summary["shift_factor"])


def test_an_oracle_student_has_no_error_and_no_drift():
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    _, reference = _toy(z, shift=0.0)
    s = trajectory_errors(reference, reference, z, 4)[0]
    assert not s.e_teacher.any() and not s.e_student.any() and not s.drift.any() and not s.handover.any()


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    from ddil_core.models.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("teacher") / "teacher"
    build_tiny_pipeline("sd15").save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_the_teacher_sampled_with_ddim_is_its_own_oracle(teacher_folder):
    """A folder without ddil_student.json is sampled with diffusers' DDIMScheduler at objective.student_steps; with
    one teacher step per interval the teacher's reference is that very step: every error and drift is zero."""
    from ddil_core.models.pipeline_io import load_pipeline
    from ddil_core.stages.diagnose import measure

    config = tiny_config("sd15", "objective.student_steps=2", "rollouts.teacher_steps=2")
    pipe = load_pipeline(str(teacher_folder))
    summary = measure(config, pipe, None, pipe, PROMPTS, 16)
    for key in ("e_teacher", "e_student", "drift", "handover"):
        assert max(abs(r["value"]) for r in summary[key]) < 1e-10, key


@pytest.fixture(scope="module")
def lcm_student(tiny_data, tmp_path_factory):
    from ddil_core.stages.distill import distill

    latents, rollouts = tiny_data["sd15"]
    config = tiny_config("sd15", "objective.name=lcm", "objective.student_steps=2", "training.steps=2")
    return distill(config, latents, [rollouts], tmp_path_factory.mktemp("lcm") / "run")


def test_ddil_diagnose_cli_writes_the_curve(lcm_student, tmp_path, capsys):
    out = tmp_path / "diagnose"
    code = main(["diagnose", "--config", "tiny", "--set", "objective.name=lcm", "--student", str(lcm_student),
                 "--out", str(out)])
    assert code in (0, None)
    assert "covariate shift: R =" in capsys.readouterr().out
    result = json.loads((out / "diagnose.json").read_text())
    assert result["num_noises"] == 8 and result["num_steps"] == 2
    assert result["shift_factor"][0]["value"] == pytest.approx(1.0, abs=1e-12)  # exact up to float summation
    assert result["drift"][0]["value"] == 0.0 and result["handover"][-1]["value"] == 0.0
    assert result["protocol"]["scheduler"] == "LCMScheduler"
    assert np.array(result["samples"]["e_student"]).shape == (8, 2)
    flat = json.loads((out / "diagnose_flat.json").read_text())
    assert set(flat) >= {"compounding", "drift_final"}
    assert (out / "covariate_shift.png").stat().st_size > 0 and (out / "handover.png").stat().st_size > 0
    assert (out / "resolved_config.yaml").is_file()


def test_evaluate_reports_the_covariate_shift_curve(lcm_student, tmp_path):
    from ddil_core.stages.evaluate import evaluate

    config = tiny_config("sd15", "objective.name=lcm")
    metrics = evaluate(config, str(lcm_student), "tiny://sd15", tmp_path / "eval")
    shift = metrics["covariate_shift"]
    assert shift["num_steps"] == 2 and shift["drift"][0]["value"] == 0.0
    assert metrics["models"]["student"]["covariate_drift_final"] == shift["drift"][-1]["value"]
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "Covariate shift" in html and "covariate_shift.png" in html
    assert (tmp_path / "eval" / "covariate_shift.png").is_file()
    flat = json.loads((tmp_path / "eval" / "metrics_flat.json").read_text())
    assert "covariate_drift_final" in flat


def test_evaluate_takes_the_curve_diagnose_measured_for_the_same_student_and_settings(lcm_student, tmp_path):
    """`ddil evaluate --covariate-shift DIR` (the DVC pipeline measures the curve once): the metrics and report carry
    the curve diagnose wrote, equal to the one evaluate measures itself; a diagnosis of another student folder or of
    other settings is refused before any sampling, naming the file and the value."""
    from ddil_core.config import ConfigError
    from ddil_core.models.pipeline_io import ModelError
    from ddil_core.stages.evaluate import evaluate

    diagnosis = tmp_path / "diagnose"
    assert main(["diagnose", "--config", "tiny", "--set", "objective.name=lcm", "--student", str(lcm_student),
                 "--out", str(diagnosis)]) in (0, None)
    config = tiny_config("sd15", "objective.name=lcm")
    measured = evaluate(config, str(lcm_student), "tiny://sd15", tmp_path / "measured")["covariate_shift"]
    taken = evaluate(config, str(lcm_student), "tiny://sd15", tmp_path / "taken",
                     covariate_shift=str(diagnosis))["covariate_shift"]
    for key in ("headline", "shift_factor", "drift", "handover"):
        assert taken[key] == measured[key], key
    assert "samples" not in taken and (tmp_path / "taken" / "covariate_shift.png").is_file()

    for key, value in (("seeds", "diagnose.num_noises=4"), ("bootstrap", "diagnose.bootstrap=200"),
                       ("teacher_steps", "rollouts.teacher_steps=8")):
        other_settings = tiny_config("sd15", "objective.name=lcm", value)
        with pytest.raises(ConfigError, match=rf"diagnose.json: protocol.{key}"):
            evaluate(other_settings, str(lcm_student), "tiny://sd15", tmp_path / "e2",
                     covariate_shift=str(diagnosis))
    prompts = tmp_path / "prompts.txt"  # the same prompts in another order: noise i would get another prompt
    prompts.write_text("\n".join(reversed(taken["protocol"]["prompt_list"])) + "\n")
    with pytest.raises(ConfigError, match=r"diagnose.json: protocol.prompt_list"):
        evaluate(config, str(lcm_student), "tiny://sd15", tmp_path / "e4", prompts=str(prompts),
                 covariate_shift=str(diagnosis))
    result = json.loads((diagnosis / "diagnose.json").read_text())
    result["protocol"]["model_digests"]["student"] = "0" * 64  # as if measured on another student folder
    (diagnosis / "diagnose.json").write_text(json.dumps(result))
    with pytest.raises(ModelError, match=r"diagnose.json: measured another student"):
        evaluate(config, str(lcm_student), "tiny://sd15", tmp_path / "e3", covariate_shift=str(diagnosis))
    assert not any((tmp_path / name).exists() for name in ("e2", "e3", "e4"))
