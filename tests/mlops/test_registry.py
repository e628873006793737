"""The register stage: gates, model cards, the local registry (with concurrent writers) and the Kubeflow adapter.

No real models are built: a student is a folder with a model_index.json and a dummy weights file. The Kubeflow
Model Registry server cannot run here; the adapter is exercised against tests/fakes/kubeflow_registry_stub.py.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ddil_core.config.schema import Config, GatesConfig
from ddil_core.registry import GateError, LocalRegistry, check_gates, failed, register_student, render_model_card
from ddil_core.registry import local as local_mod
from ddil_core.registry.model_card import current_code_version, git_commit, redact

from tests import ROOT
from tests.fakes.kubeflow_registry_stub import PREFIX, KubeflowRegistryStub


# ----------------------------------------------------------------------------------------------------------------
# fixtures


def make_student(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            }
        )
    )
    (path / "unet").mkdir()
    (path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(64 * 1024))
    (path / "scheduler").mkdir()
    (path / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler"}')
    return path


def make_metrics(student_fid=22.0, teacher_fid=20.0, coverage=0.6, adherence=0.9, tag="t") -> dict:
    def model(fid, cov, adh, steps):
        return {
            "fid": fid,
            "precision": 0.7,
            "recall": 0.5,
            "density": 0.9,
            "coverage": cov,
            "adherence": adh,
            "diversity": 0.3,
            "nfe_per_image": steps * 2,
            "seconds_per_image": 0.01 * steps,
            "steps": steps,
        }

    return {
        "protocol": {"num_prompts": 10, "images_per_prompt": 4, "extractor": "classifier", "seed": 0, "tag": tag},
        "models": {
            "student": model(student_fid, coverage, adherence, 4),
            "teacher": model(teacher_fid, 0.7, 0.95, 50),
            "baseline": model(40.0, 0.3, 0.6, 4),
        },
    }


@pytest.fixture
def student(tmp_path):
    return make_student(tmp_path / "student")


@pytest.fixture
def config(tmp_path):
    cfg = Config()
    cfg.registry.uri = str(tmp_path / "registry")
    cfg.registry.model_name = "ddil-student"
    cfg.registry.gates = GatesConfig(fid_factor=1.5, min_coverage=0.3, min_adherence=0.5)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# gates


def test_gates_pass_and_off():
    results = check_gates(make_metrics(), GatesConfig(fid_factor=1.5, min_coverage=0.3, min_adherence=0.5))
    assert [r.name for r in results] == ["fid_factor", "min_coverage", "min_adherence"]
    assert all(r.passed for r in results) and failed(results) == []
    fid = results[0]
    assert fid.actual == 22.0 and fid.threshold == pytest.approx(30.0)
    assert check_gates(make_metrics(), GatesConfig()) == []  # all gates off


def test_gates_fail_with_actual_and_threshold():
    results = check_gates(
        make_metrics(student_fid=35.0, coverage=0.1), GatesConfig(fid_factor=1.5, min_coverage=0.3, min_adherence=0.5)
    )
    bad = failed(results)
    assert [r.name for r in bad] == ["fid_factor", "min_coverage"]
    assert bad[0].actual == 35.0 and bad[0].threshold == pytest.approx(30.0)
    assert "35" in bad[0].message and "30" in bad[0].message
    assert bad[1].actual == 0.1 and bad[1].threshold == 0.3


@pytest.mark.parametrize(
    "drop, gate, key",
    [
        (("student", "fid"), "fid_factor", "models.student.fid"),
        (("teacher", "fid"), "fid_factor", "models.teacher.fid"),
        (("student", "coverage"), "min_coverage", "models.student.coverage"),
        (("student", "adherence"), "min_adherence", "models.student.adherence"),
    ],
)
def test_missing_metric_fails_its_gate(drop, gate, key):
    metrics = make_metrics()
    del metrics["models"][drop[0]][drop[1]]
    bad = failed(check_gates(metrics, GatesConfig(fid_factor=1.5, min_coverage=0.3, min_adherence=0.5)))
    assert [r.name for r in bad] == [gate]
    assert key in bad[0].message and "missing" in bad[0].message


def test_nonfinite_or_null_metric_fails():
    metrics = make_metrics()
    metrics["models"]["student"]["fid"] = math.nan
    metrics["models"]["student"]["coverage"] = None
    bad = failed(check_gates(metrics, GatesConfig(fid_factor=1.5, min_coverage=0.3)))
    assert [r.name for r in bad] == ["fid_factor", "min_coverage"]
    assert "not finite" in bad[0].message and "null" in bad[1].message
    assert failed(check_gates({}, GatesConfig(min_coverage=0.1)))[0].message.count("models.student.coverage") == 1


# ----------------------------------------------------------------------------------------------------------------
# local registry


def test_register_student_versions_card_and_metrics(config, student, tmp_path):
    metrics = make_metrics()
    e1 = register_student(config, str(student), metrics)
    e2 = register_student(config, str(student), metrics)
    assert (e1["version"], e2["version"]) == (1, 2)

    root = tmp_path / "registry"
    for entry, n in ((e1, 1), (e2, 2)):
        folder = root / "ddil-student" / f"v{n}"
        assert Path(entry["path"]) == folder.resolve()
        assert (folder / "model_index.json").read_text() == (student / "model_index.json").read_text()
        assert (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
            student / "unet" / "diffusion_pytorch_model.safetensors"
        ).read_bytes()
        assert json.loads((folder / "metrics.json").read_text()) == metrics
        card = (folder / "README.md").read_text()
        assert f"# ddil-student (version {n})" in card
        assert "| metric | student | teacher | baseline |" in card
        assert "| fid | 22 | 20 | 40 |" in card
        assert "## Evaluation protocol" in card and "num_prompts" in card
        assert "```yaml" in card and "objective:" in card and "student_steps: 4" in card
        assert "demo://digits" in card  # data version
        assert "Code version: `ddil " in card
        assert f'DiffusionPipeline.from_pretrained("{folder.resolve()}")' in card
        assert "num_inference_steps=4" in card
        assert "| fid_factor | yes |" in card
        assert entry["source"] == str(student)
        assert [g["name"] for g in entry["gates"]] == ["fid_factor", "min_coverage", "min_adherence"]
        assert entry["metrics"] == metrics and entry["created"].endswith("+00:00")

    index = json.loads((root / "index.json").read_text())
    assert [e["version"] for e in index["models"]["ddil-student"]] == [1, 2]
    reg = LocalRegistry(root)
    assert [e["version"] for e in reg.list_versions("ddil-student")] == [1, 2]
    assert reg.get("ddil-student")["version"] == 2 and reg.get("ddil-student", 1)["path"] == e1["path"]
    assert reg.list_versions("other") == []
    with pytest.raises(KeyError, match="no version 7"):
        reg.get("ddil-student", 7)
    assert sorted(p.name for p in (root / "ddil-student").iterdir()) == ["v1", "v2"]  # no temporary folders

    # registry_uri overrides config.registry.uri
    other = register_student(config, str(student), metrics, registry_uri=str(tmp_path / "elsewhere"))
    assert other["version"] == 1 and (tmp_path / "elsewhere" / "ddil-student" / "v1" / "README.md").is_file()


def test_failing_gates_raise_and_register_nothing(config, student, tmp_path):
    metrics = make_metrics(student_fid=35.0, coverage=0.1, adherence=0.9)
    with pytest.raises(GateError) as info:
        register_student(config, str(student), metrics)
    msg = str(info.value)
    assert "fid_factor" in msg and "35" in msg and "threshold 30" in msg
    assert "min_coverage" in msg and "0.1" in msg and "threshold 0.3" in msg
    assert "min_adherence" not in msg  # it passed
    assert [r.name for r in info.value.failed] == ["fid_factor", "min_coverage"]
    assert not (tmp_path / "registry").exists()  # no entry, no folder, no index

    # with a registry that already has versions: nothing is added
    register_student(config, str(student), make_metrics())
    with pytest.raises(GateError, match="models.student.adherence"):
        bad = make_metrics()
        del bad["models"]["student"]["adherence"]
        register_student(config, str(student), bad)
    assert [e["version"] for e in LocalRegistry(tmp_path / "registry").list_versions("ddil-student")] == [1]
    assert sorted(p.name for p in (tmp_path / "registry" / "ddil-student").iterdir()) == ["v1"]


def test_bad_student_folder_is_refused(config, tmp_path):
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        register_student(config, str(tmp_path / "not-a-pipeline"), make_metrics())
    with pytest.raises(FileNotFoundError, match="student folder not found"):
        register_student(config, str(tmp_path / "missing"), make_metrics())
    assert not (tmp_path / "registry" / "ddil-student").exists()


def test_remote_student_uri_is_recorded_not_copied(config, tmp_path):
    entry = register_student(config, "s3://bucket/runs/7/student", make_metrics())
    folder = Path(entry["path"])
    assert entry["model_uri"] == "s3://bucket/runs/7/student" and entry["source"] == "s3://bucket/runs/7/student"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "metrics.json"]
    assert "aws s3 cp --recursive s3://bucket/runs/7/student" in (folder / "README.md").read_text()


def test_failure_mid_registration_leaves_nothing(config, student, tmp_path, monkeypatch):
    root = tmp_path / "registry"
    real_copytree = local_mod.shutil.copytree

    def copy_then_fail(src, dst, *a, **k):
        real_copytree(src, dst, *a, **k)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(local_mod.shutil, "copytree", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        register_student(config, str(student), make_metrics())
    assert not (root / "ddil-student").exists() and not (root / "index.json").exists()
    monkeypatch.undo()

    register_student(config, str(student), make_metrics())  # v1 succeeds
    before = (root / "index.json").read_text()

    def fail_index(self, index):
        raise OSError("index write failed (simulated)")

    monkeypatch.setattr(LocalRegistry, "_write_index", fail_index)
    with pytest.raises(OSError, match="index write failed"):
        register_student(config, str(student), make_metrics())
    assert (root / "index.json").read_text() == before
    assert sorted(p.name for p in (root / "ddil-student").iterdir()) == ["v1"]
    monkeypatch.undo()

    # a crashed registration's temporary folder is cleaned and its number is not reused wrongly
    (root / "ddil-student" / "v2.tmp-99999").mkdir()
    (root / "ddil-student" / "v2.tmp-99999" / "partial").write_text("x")
    assert register_student(config, str(student), make_metrics())["version"] == 2
    assert sorted(p.name for p in (root / "ddil-student").iterdir()) == ["v1", "v2"]


_WRITER = textwrap.dedent(
    """
    import os, sys, time, json
    from pathlib import Path
    from ddil_core.registry.local import LocalRegistry
    root, student, sync, tag, count = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    (sync / f"ready-{tag}").touch()
    deadline = time.time() + 60
    while not (sync / "go").exists():
        if time.time() > deadline:
            sys.exit("no go signal")
        time.sleep(0.002)
    reg = LocalRegistry(root)
    out = []
    for i in range(count):
        metrics = {"protocol": {"writer": tag, "i": i}, "models": {"student": {"fid": 1.0}}}
        card = lambda v, p, tag=tag, i=i: f"card of version {v} by {tag}/{i} at {p}\\n"
        e = reg.register("ddil-student", student, metrics, card, extra={"writer": tag})
        out.append(e["version"])
    print(json.dumps(out))
    """
)


def test_concurrent_registrations_get_distinct_versions(student, tmp_path):
    root, sync = tmp_path / "registry", tmp_path / "sync"
    sync.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    per_writer = 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(root), str(student), str(sync), tag, str(per_writer)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    deadline = time.time() + 60
    while not all((sync / f"ready-{t}").exists() for t in ("a", "b")):
        assert time.time() < deadline, "writers did not start"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    (sync / "go").touch()  # both start registering at the same moment
    versions = {}
    for tag, p in zip(("a", "b"), procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        versions[tag] = json.loads(out.strip().splitlines()[-1])

    allv = versions["a"] + versions["b"]
    assert sorted(allv) == list(range(1, 2 * per_writer + 1))  # distinct, no gaps
    index = json.loads((root / "index.json").read_text())
    entries = index["models"]["ddil-student"]
    assert sorted(e["version"] for e in entries) == sorted(allv)
    for e in entries:
        folder = Path(e["path"])
        assert folder.name == f"v{e['version']}"
        assert (folder / "model_index.json").is_file()
        card = (folder / "README.md").read_text()
        assert card.startswith(f"card of version {e['version']} by {e['writer']}/")
        assert json.loads((folder / "metrics.json").read_text()) == e["metrics"]
        assert e["metrics"]["protocol"]["writer"] == e["writer"]
    assert sorted(p.name for p in (root / "ddil-student").iterdir()) == [f"v{i}" for i in sorted(allv)]
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------------------------------------------------------
# model card


def test_the_model_card_is_a_hub_model_card(config, student, tmp_path, monkeypatch):
    """README.md loads with huggingface_hub's ModelCard: diffusers, text-to-image, the tags, and base_model only for a
    teacher that is a Hub id (not tiny://, not a local folder), beside every section of our own."""
    from huggingface_hub import ModelCard

    entry = register_student(config, str(student), make_metrics())  # Config(): the teacher tiny://sd15
    card = ModelCard.load(Path(entry["path"]) / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"ddil", "distillation", "text-to-image", "diffusers", "pd"} <= set(card.data.tags)
    assert card.data.base_model is None
    for section in ("## Evaluation", "## Quality gates", "## Evaluation protocol", "## Recipe", "## Data", "## Code",
                    "## Lineage", "## Usage"):
        assert section in card.text, section
    hub = render_model_card("m", 1, make_metrics(), {"model": {"teacher": "stabilityai/sd-turbo"}}, None, "ddil x")
    assert ModelCard(hub).data.base_model == "stabilityai/sd-turbo"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo" / "teacher").mkdir(parents=True)  # a local folder that looks like a Hub id
    local = render_model_card("m", 1, make_metrics(), {"model": {"teacher": "demo/teacher"}}, None, "ddil x")
    assert ModelCard(local).data.base_model is None


def test_model_card_never_renders_credentials(monkeypatch):
    config_dict = {
        "model": {"teacher": "s3://AKIAEXAMPLE:supersecretvalue@bucket/teacher"},
        "storage": {"aws_secret_access_key": "SECRET-1", "password": "SECRET-2", "api_token": "SECRET-3"},
        "objective": {"name": "pd", "student_steps": 4},
        "Access_Key_Id": "SECRET-4",
    }
    metrics = make_metrics()
    metrics["protocol"]["hf_token"] = "SECRET-5"
    metrics["models"]["student"]["api_key"] = "SECRET-6"
    card = render_model_card(
        "m",
        3,
        metrics,
        config_dict,
        "https://user:SECRET-7@data.example.com/set.tar?X-Amz-Signature=SECRET-8&X-Amz-Credential=x",
        "ddil 0.1.0 (git abc1234)",
    )
    for secret in ("supersecretvalue", "AKIAEXAMPLE", *(f"SECRET-{i}" for i in range(1, 9))):
        assert secret not in card, secret
    assert "student_steps: 4" in card and "s3://***@bucket/teacher" in card
    assert "https://***@data.example.com/set.tar" in card
    assert "ddil 0.1.0 (git abc1234)" in card
    assert redact({"a": [{"secret_thing": 1, "b": 2}]}) == {"a": [{"b": 2}]}


def test_code_version_uses_git_when_available(tmp_path, monkeypatch):
    monkeypatch.delenv("DDIL_GIT_COMMIT", raising=False)
    not_repo = tmp_path / "plain"
    not_repo.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_commit(str(not_repo)) == "unknown"
    assert current_code_version(str(not_repo)).endswith("(git unknown)")
    monkeypatch.setenv("DDIL_GIT_COMMIT", "feedbeef")  # images have no .git; the build bakes the commit
    assert git_commit(str(not_repo)) == "feedbeef"
    monkeypatch.delenv("DDIL_GIT_COMMIT")

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    try:
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        (repo / "f").write_text("x")
        subprocess.run(git + ["add", "f"], cwd=repo, check=True)
        subprocess.run(git + ["commit", "-qm", "init"], cwd=repo, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not usable here")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert git_commit(str(repo)) == head
    (repo / "f").write_text("changed")
    assert git_commit(str(repo)) == head + "-dirty"
    assert current_code_version(str(repo)).startswith("ddil ")


# ----------------------------------------------------------------------------------------------------------------
# Kubeflow Model Registry adapter (against the stub: the real server cannot run here)


@pytest.fixture
def stub():
    with KubeflowRegistryStub() as s:
        yield s


def test_kubeflow_adapter_sends_expected_requests(config, student, stub, tmp_path):
    config.registry.kubeflow_address = "127.0.0.1"
    config.registry.kubeflow_port = stub.port
    metrics = make_metrics()

    e1 = register_student(config, str(student), metrics)
    e2 = register_student(config, "s3://bucket/runs/8/student", metrics)
    assert (e1["version"], e2["version"]) == ("v1", "v2")
    assert e1["registry"] == "kubeflow" and e1["uri"] == student.resolve().as_uri()
    assert not (tmp_path / "registry").exists()  # nothing local

    posts = stub.calls("POST")
    mv1, mv2 = e1["model_version_id"], e2["model_version_id"]
    assert posts == [
        ("POST", f"{PREFIX}/registered_models"),  # once: the second registration reuses the model
        ("POST", f"{PREFIX}/model_versions"),
        ("POST", f"{PREFIX}/model_versions/{mv1}/artifacts"),
        ("POST", f"{PREFIX}/model_versions"),
        ("POST", f"{PREFIX}/model_versions/{mv2}/artifacts"),
    ]
    gets = [(r["path"], r["query"]) for r in stub.requests if r["method"] == "GET"]
    assert (f"{PREFIX}/registered_models", {"pageSize": "1", "sortOrder": "ASC"}) in gets  # connection check
    assert (f"{PREFIX}/registered_model", {"name": "ddil-student"}) in gets
    assert (f"{PREFIX}/model_version", {"name": "v1", "parentResourceId": e1["registered_model_id"]}) in gets

    bodies = [r["body"] for r in stub.requests if r["method"] == "POST"]
    assert bodies[0]["name"] == "ddil-student"
    for body, version in ((bodies[1], "v1"), (bodies[3], "v2")):
        assert body["name"] == version and body["registeredModelId"] == e1["registered_model_id"]
        props = body["customProperties"]
        assert props["fid_student"] == {"double_value": 22.0, "metadataType": "MetadataDoubleValue"}
        assert props["fid_teacher"]["double_value"] == 20.0
        assert props["coverage_student"]["double_value"] == 0.6
        assert props["steps_student"] == {"int_value": "4", "metadataType": "MetadataIntValue"}
        assert props["gate_fid_factor_passed"] == {"bool_value": True, "metadataType": "MetadataBoolValue"}
        assert props["data_uri"]["string_value"] == "demo://digits"
        card = props["model_card"]["string_value"]
        assert f"(version {version})" in card and "DiffusionPipeline.from_pretrained(" in card
    for body, uri in ((bodies[2], student.resolve().as_uri()), (bodies[4], "s3://bucket/runs/8/student")):
        assert body["artifactType"] == "model-artifact"
        assert body["modelFormatName"] == "diffusers" and body["uri"] == uri
    assert bodies[2]["modelFormatVersion"] == "0.42.1"  # from the student's model_index.json

    # what the stub stored is readable back through the adapter
    from ddil_core.registry.kubeflow_model_registry import KubeflowRegistry

    reg = KubeflowRegistry("127.0.0.1", stub.port, author="reader")
    assert [v["version"] for v in reg.list_versions("ddil-student")] == ["v1", "v2"]
    got = reg.get("ddil-student", "v2")
    assert got["uri"] == "s3://bucket/runs/8/student" and got["model_format_name"] == "diffusers"
    assert got["metadata"]["fid_student"] == 22.0
    assert reg.list_versions("unknown-model") == []


def test_kubeflow_gate_failure_sends_nothing(config, student, stub):
    config.registry.kubeflow_address = "127.0.0.1"
    config.registry.kubeflow_port = stub.port
    with pytest.raises(GateError, match="min_adherence"):
        register_student(config, str(student), make_metrics(adherence=0.1))
    assert stub.requests == []


# ----------------------------------------------------------------------------------------------------------------
# lineage: code, data, caches, run ids and an s3:// URI on every registered version

LINEAGE = {"git_sha": "0123456789abcdef0123456789abcdef01234567", "dataset": "demo://digits",
           "dataset_sha256": "d" * 64, "latent_cache_sha256": "c" * 64, "rollouts_sha256": "r" * 64,
           "run_id": "8f14e45f-ceea-467f-a0e6-2b5c4d7e3a10", "kfp_run_id": "8f14e45f-ceea-467f-a0e6-2b5c4d7e3a10"}
KFP_URI = "minio://mlpipeline/v2/artifacts/ddil/8f14e45f-ceea-467f-a0e6-2b5c4d7e3a10/distill/student"


def _trained_student(tmp_path):
    """A student folder as distill leaves it: ddil_student.json with the lineage distill recorded."""
    path = make_student(tmp_path / "student")
    (path / "ddil_student.json").write_text(json.dumps({"num_inference_steps": 4, "lineage": LINEAGE}))
    return path


def test_lineage_maps_kfp_artifact_uris_to_s3():
    from ddil_core.registry.lineage import s3_uri

    assert s3_uri(KFP_URI) == "s3://mlpipeline/v2/artifacts/ddil/8f14e45f-ceea-467f-a0e6-2b5c4d7e3a10/distill/student"
    assert s3_uri("s3://models/student") == "s3://models/student"
    assert s3_uri("/tmp/student") is None and s3_uri("gs://b/x") is None and s3_uri(None) is None


def test_local_registry_version_holds_the_lineage(config, tmp_path, monkeypatch):
    student = _trained_student(tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    (project / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    monkeypatch.chdir(project)  # register runs in the DVC project
    entry = register_student(config, str(student), make_metrics(), model_uri=KFP_URI)
    lineage = entry["lineage"]
    assert {k: lineage[k] for k in LINEAGE} == LINEAGE
    import hashlib

    assert lineage["dvc_lock_sha256"] == hashlib.sha256((project / "dvc.lock").read_bytes()).hexdigest()
    assert lineage["model_s3_uri"].startswith("s3://mlpipeline/v2/artifacts/ddil/")
    stored = LocalRegistry(config.registry.uri).get("ddil-student", entry["version"])
    assert stored["lineage"] == lineage
    card = (Path(entry["path"]) / "README.md").read_text()
    assert "## Lineage" in card and LINEAGE["git_sha"] in card and LINEAGE["dataset_sha256"] in card


def test_kubeflow_version_holds_the_lineage_an_s3_uri_and_its_model_source(config, stub, tmp_path, monkeypatch):
    config.registry.kubeflow_address = "127.0.0.1"
    config.registry.kubeflow_port = stub.port
    monkeypatch.setenv("DDIL_NAMESPACE", "ml-team")
    monkeypatch.setenv("DDIL_KFP_RUN_NAME", "ddil-nightly")
    monkeypatch.chdir(tmp_path)  # no dvc.lock here: dvc_lock_sha256 is absent
    entry = register_student(config, str(_trained_student(tmp_path)), make_metrics(), model_uri=KFP_URI)
    s3 = "s3://mlpipeline/v2/artifacts/ddil/8f14e45f-ceea-467f-a0e6-2b5c4d7e3a10/distill/student"
    assert entry["uri"] == s3
    bodies = [r["body"] for r in stub.requests if r["method"] == "POST"]
    version_body, artifact_body = bodies[1], bodies[2]
    props = version_body["customProperties"]
    for key, value in LINEAGE.items():
        assert props[key]["string_value"] == value, key
    assert props["model_s3_uri"]["string_value"] == s3 and "dvc_lock_sha256" not in props
    assert artifact_body["uri"] == s3 and artifact_body["modelFormatVersion"] == "0.42.1"
    assert {k: artifact_body.get(k) for k in ("modelSourceKind", "modelSourceClass", "modelSourceGroup",
                                              "modelSourceId", "modelSourceName")} == {
        "modelSourceKind": "kfp", "modelSourceClass": "pipelinerun", "modelSourceGroup": "ml-team",
        "modelSourceId": LINEAGE["kfp_run_id"], "modelSourceName": "ddil-nightly"}
    from ddil_core.registry.kubeflow_model_registry import KubeflowRegistry

    got = KubeflowRegistry("127.0.0.1", stub.port).get("ddil-student", entry["version"])
    assert got["uri"] == s3 and got["metadata"]["git_sha"] == LINEAGE["git_sha"]
    assert got["metadata"]["kfp_run_id"] == LINEAGE["kfp_run_id"]


def test_a_student_without_lineage_registers_with_what_register_knows(config, student, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DDIL_KFP_RUN_ID", raising=False)
    entry = register_student(config, str(student), make_metrics())
    assert entry["lineage"] == {}
    assert "## Lineage" in (Path(entry["path"]) / "README.md").read_text()
