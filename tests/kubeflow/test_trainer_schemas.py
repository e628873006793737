"""Every Kubeflow Trainer / Training Operator object ddil ships (k8s/training/) or creates (components/trainjob.py)
is valid, under the API server's strict field validation, on every release we claim to support: Trainer v2.1.0,
v2.2.1 and v2.3.0 (TrainJob, TrainingRuntime: trainer.kubeflow.org/v1alpha1) and Training Operator v1.9.4
(PyTorchJob: kubeflow.org/v1). Schemas: the released CRDs (tests/fakes/crd_schemas/, see
tests/fakes/crd_validate.py)."""
from __future__ import annotations

import copy

import pytest
import yaml

from tests import ROOT
from tests.fakes import crd_validate

TRAINING = ROOT / "k8s" / "training"
SHIPPED = {"trainjob.yaml": "TrainJob", "trainingruntime.yaml": "TrainingRuntime", "pytorchjob.yaml": "PyTorchJob"}


def _cases(kinds):
    return [(name, version) for name, kind in SHIPPED.items() if kind in kinds
            for version in crd_validate.versions(kind)]


@pytest.mark.parametrize("name, version", _cases(set(SHIPPED.values())))
def test_shipped_manifest_is_valid_on_every_supported_release(name, version):
    obj = yaml.safe_load((TRAINING / name).read_text())
    assert obj["kind"] == SHIPPED[name]
    crd_validate.validate(obj, version)


def _created(kind: str, num_nodes: int, gpus: int) -> dict:
    from components.trainjob import distill_job_args, distill_job_name, pytorchjob_manifest, trainjob_manifest

    name = distill_job_name("5f0d6c1e-0a4b-4b7e-9a53-2d1f3c0b9e77")
    args = distill_job_args("/data/ddil-runs/x/config.yaml", "/data/ddil-runs/x/latents",
                            "/data/ddil-runs/x/rollouts", "/data/ddil-runs/x/distill")
    if kind == "TrainJob":
        return trainjob_manifest(name, "ddil", "registry.example.com/ddil/ddil:0.1.0", num_nodes, gpus,
                                 "nvidia.com/gpu", args)
    return pytorchjob_manifest(name, "ddil", "registry.example.com/ddil/ddil:0.1.0", num_nodes, gpus,
                               "nvidia.com/gpu", args)


@pytest.mark.parametrize("kind", ["TrainJob", "PyTorchJob"])
@pytest.mark.parametrize("num_nodes, gpus", [(1, 0), (2, 1), (4, 8)])
def test_jobs_the_launcher_creates_are_valid_on_every_supported_release(kind, num_nodes, gpus):
    obj = _created(kind, num_nodes, gpus)
    for version in crd_validate.versions(kind):
        crd_validate.validate(obj, version)


def test_torch_num_proc_per_node_in_a_runtime_is_rejected_from_trainer_v2_2():
    """The field the runtime used to set (mlPolicy.torch.numProcPerNode): valid on v2.1, removed in v2.2.0."""
    runtime = yaml.safe_load((TRAINING / "trainingruntime.yaml").read_text())
    runtime["spec"]["mlPolicy"].setdefault("torch", {})["numProcPerNode"] = "auto"
    assert crd_validate.errors(runtime, "v2.1.0") == []
    for version in ("v2.2.1", "v2.3.0"):
        (problem,) = crd_validate.errors(runtime, version)
        assert problem.startswith("spec.mlPolicy.torch:") and "numProcPerNode" in problem


def test_strict_validation_rejects_unknown_fields_and_wrong_types_anywhere():
    runtime = yaml.safe_load((TRAINING / "trainingruntime.yaml").read_text())
    pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    bad = copy.deepcopy(runtime)
    bad["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0][
        "volumeMount"] = pod["containers"][0]["volumeMounts"]  # a typo of volumeMounts
    assert any("volumeMount" in p for p in crd_validate.errors(bad, "v2.3.0"))
    job = yaml.safe_load((TRAINING / "trainjob.yaml").read_text())
    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["numProcPerNode"] = "auto"  # IntOrString on v2.1, an integer from v2.2
    assert crd_validate.errors(bad, "v2.1.0") == []
    assert any("numProcPerNode" in p for p in crd_validate.errors(bad, "v2.3.0"))
    bad = copy.deepcopy(job)
    bad["metadata"]["name"] = "Distill_Job"
    assert any(p.startswith("metadata.name") for p in crd_validate.errors(bad, "v2.3.0"))
    pytorchjob = yaml.safe_load((TRAINING / "pytorchjob.yaml").read_text())
    bad = copy.deepcopy(pytorchjob)
    bad["spec"]["nprocPerNode"] = 8  # a string in the v1 API
    assert any(p.startswith("spec.nprocPerNode") for p in crd_validate.errors(bad, "v1.9.4"))
    bad = copy.deepcopy(pytorchjob)
    bad["apiVersion"] = "kubeflow.org/v2"
    assert any(p.startswith("apiVersion") for p in crd_validate.errors(bad, "v1.9.4"))


def test_vendored_schemas_name_their_release():
    import json

    for kind, files in crd_validate.FILES.items():
        for version, name in files.items():
            data = json.loads((crd_validate.SCHEMAS / name).read_text())
            assert data["kind"] == kind and data["source"]["tag"] == version
            assert len(data["source"]["commit"]) == 40
            # a CRD file; for Katib's Experiment, whose CRD declares no structure, the API's OpenAPI document
            assert data["source"]["path"].endswith(".yaml" if kind != "Experiment" else "swagger.json")


def _fields_lost(obj: dict, model) -> list[str]:
    """Paths of `obj` that a round trip through a generated model drops (fields the model does not know)."""
    back = model.from_dict(obj).to_dict()
    lost = []

    def walk(a, b, path):
        if isinstance(a, dict):
            for key, value in a.items():
                if not isinstance(b, dict) or key not in b:
                    lost.append(f"{path}.{key}".lstrip("."))
                else:
                    walk(value, b[key], f"{path}.{key}")
        elif isinstance(a, list) and isinstance(b, list):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif a != b:
            lost.append(f"{path.lstrip('.')} ({a!r} read as {b!r})")

    walk(obj, back, "")
    return lost


def test_the_kubeflow_sdk_models_of_trainer_v2_3_know_every_field_we_set():
    """A second, independent check at v2.3.0: the Kubeflow SDK's generated API models (kubeflow-trainer-api 2.3.0,
    the version kubeflow==0.5.0 installs from PyPI) read every field of the shipped and created Trainer objects."""
    from importlib.metadata import version

    from kubeflow_trainer_api import models

    assert version("kubeflow-trainer-api") == "2.3.0"
    job_model, runtime_model = models.TrainerV1alpha1TrainJob, models.TrainerV1alpha1TrainingRuntime
    assert _fields_lost(yaml.safe_load((TRAINING / "trainjob.yaml").read_text()), job_model) == []
    runtime = yaml.safe_load((TRAINING / "trainingruntime.yaml").read_text())
    assert _fields_lost(runtime, runtime_model) == []
    for num_nodes, gpus in [(1, 0), (4, 8)]:
        assert _fields_lost(_created("TrainJob", num_nodes, gpus), job_model) == []
    runtime["spec"]["mlPolicy"]["torch"]["numProcPerNode"] = "auto"  # the field removed in v2.2.0
    assert _fields_lost(runtime, runtime_model) == ["spec.mlPolicy.torch.numProcPerNode"]
