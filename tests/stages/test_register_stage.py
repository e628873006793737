"""Stage register through the CLI: gates pass -> a version in a local registry; gates fail -> exit 3, nothing written;
a missing or unreadable metrics file -> exit 2 naming it."""
from __future__ import annotations

import json

import pytest

from ddil_core.cli import main

METRICS = {
    "protocol": {"extractor": "classifier:demo/classifier", "k": 5},
    "models": {
        "student": {"steps": 2, "fid": 30.0, "coverage": 0.6, "adherence": 0.9, "nfe_per_image": 2},
        "teacher": {"steps": 50, "fid": 25.0, "coverage": 0.8, "adherence": 0.99, "nfe_per_image": 100},
    },
    "speedup": {"nfe": 50.0},
}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from ddil_core.models.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("reg") / "student"
    build_tiny_pipeline("sd15").save_pretrained(str(folder), safe_serialization=True)
    (folder / "ddil_student.json").write_text(json.dumps({"num_inference_steps": 2, "guidance_scale": 1.0}))
    return folder


@pytest.fixture
def metrics_file(student, tmp_path):
    """METRICS as evaluate writes them for `student`: with the digest of the folder it evaluated."""
    from ddil_core.data.shards import folder_digest

    path = tmp_path / "eval" / "metrics.json"
    path.parent.mkdir()
    metrics = json.loads(json.dumps(METRICS))
    metrics["protocol"]["model_digests"] = {"student": folder_digest(student)}
    path.write_text(json.dumps(metrics))
    return path


def _register(student, metrics, registry, *gates):
    args = ["register", "--config", "tiny", "--student", str(student), "--metrics", str(metrics),
            "--registry", str(registry)]
    for gate in gates:
        args += ["--set", f"registry.gates.{gate}"]
    return main(args)


def test_passing_gates_write_a_version(student, metrics_file, tmp_path, capsys):
    reg = tmp_path / "registry"
    code = _register(student, metrics_file, reg, "fid_factor=1.5", "min_coverage=0.5", "min_adherence=0.8")
    assert code == 0, capsys.readouterr().err
    assert "registered ddil-student version 1" in capsys.readouterr().out
    index = json.loads((reg / "index.json").read_text())
    [entry] = index["models"]["ddil-student"]
    assert entry["version"] == 1 and entry["metrics"]["models"]["student"]["fid"] == 30.0
    assert {g["name"] for g in entry["gates"]} == {"fid_factor", "min_coverage", "min_adherence"}
    version = reg / "ddil-student" / "v1"
    for name in ("model_index.json", "unet", "ddil_student.json", "README.md", "metrics.json"):
        assert (version / name).exists(), name
    # An evaluate output folder is accepted for --metrics too; the next registration is version 2.
    assert _register(student, metrics_file.parent, reg, "fid_factor=1.5") == 0
    assert "version 2" in capsys.readouterr().out


def test_failing_gates_exit_3_name_them_and_write_nothing(student, metrics_file, tmp_path, capsys):
    reg = tmp_path / "registry"
    code = _register(student, metrics_file, reg, "fid_factor=1.1", "min_coverage=0.7", "min_adherence=0.5")
    assert code == 3
    err = capsys.readouterr().err
    assert "fid_factor" in err and "min_coverage" in err and "min_adherence" not in err  # adherence 0.9 passed
    assert "30" in err and "27.5" in err  # the student's FID and the threshold 25 x 1.1
    assert not (reg / "index.json").exists() and not (reg / "ddil-student").exists()


def test_missing_or_bad_metrics_exit_2_naming_the_file(student, tmp_path, capsys):
    reg = tmp_path / "registry"
    missing = tmp_path / "nowhere" / "metrics.json"
    assert _register(student, missing, reg) == 2
    assert str(missing) in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert _register(student, bad, reg) == 2
    assert str(bad) in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"fid": 3.0}))
    assert _register(student, wrong, reg) == 2
    err = capsys.readouterr().err
    assert str(wrong) in err and "'models'" in err
    assert not reg.exists()
