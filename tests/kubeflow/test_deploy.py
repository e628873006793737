"""Serving on the cluster: k8s/serving/inferenceservice.yaml, the pipeline's deploy step and its place in the DAG.

- The InferenceService validates against KServe 0.20.0's CRD schema (tests/fakes/schemas/, strict: unknown fields are
  errors) and its predictor, a pod spec, against the core/v1 Pod schema (kubernetes-validate, strict); the
  manifest the deploy step builds is the checked-in template with the run's values.
- The deploy component runs against tests/fakes/kube_api_stub.py, a stub of the Kubernetes API server (the real one,
  with KServe's controller, cannot run here), through the real `kubernetes` client and a kubeconfig.
- The compiled pipeline runs deploy only inside the gates' condition and only when `deploy` is true.
"""
from __future__ import annotations

import copy
import json
import os
import re
from types import SimpleNamespace

import pytest
import yaml

from tests import ROOT
from tests.fakes.kube_api_stub import KubeApiStub, crd_validator, schema_errors

TEMPLATE = ROOT / "k8s" / "serving" / "inferenceservice.yaml"
PIPELINE_YAML = ROOT / "pipelines" / "ddil.yaml"


def template() -> dict:
    return yaml.safe_load(TEMPLATE.read_text())


def template_manifest() -> dict:
    """What the deploy step builds for the template's own values."""
    from components.deploy import inferenceservice_manifest

    t = template()
    return inferenceservice_manifest("ddil-student", "ddil", t["spec"]["predictor"]["containers"][0]["image"],
                                     t["metadata"]["annotations"]["ddil.io/model-uri"], "ddil-student", "v1")


# ----------------------------------------------------------------------------------------------------------------
# the manifest


def test_template_and_built_manifest_pass_the_kserve_crd_schema():
    validator = crd_validator()
    for obj in (template(), template_manifest()):
        assert schema_errors(obj, validator) == []


def test_the_crd_schema_check_catches_mistakes():
    validator = crd_validator()
    typo = copy.deepcopy(template())
    typo["spec"]["predicter"] = typo["spec"].pop("predictor")
    assert any("predicter" in e for e in schema_errors(typo, validator))
    wrong = copy.deepcopy(template())
    wrong["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "http"
    assert any("containerPort" in e for e in schema_errors(wrong, validator))
    unknown = copy.deepcopy(template())
    unknown["spec"]["predictor"]["containers"][0]["gpus"] = 1
    assert any("gpus" in e for e in schema_errors(unknown, validator))


def test_predictor_is_a_valid_pod_spec_wired_to_the_base():
    import kubernetes_validate

    for obj in (template(), template_manifest()):
        predictor = copy.deepcopy(obj["spec"]["predictor"])
        pod_spec = {k: v for k, v in predictor.items() if k not in ("minReplicas", "maxReplicas")}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor-check"}, "spec": pod_spec}
        for version in ("1.28.0", kubernetes_validate.latest_version()):
            kubernetes_validate.validate(pod, version, strict=True)
        assert predictor["serviceAccountName"] == "ddil-worker"  # k8s/base/rbac.yaml: no API rights
        assert predictor["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert predictor["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        [container] = predictor["containers"]
        assert container["name"] == "kserve-container"
        assert container["envFrom"] == [{"secretRef": {"name": "ddil-s3-credentials", "optional": True}}]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        name = obj["metadata"]["name"]
        assert container["readinessProbe"]["httpGet"]["path"] == f"/v2/models/{name}/ready"


def test_built_manifest_is_the_template():
    assert template_manifest() == template()


def test_container_runs_a_valid_ddil_serve_command_line():
    from ddil_core.cli import build_parser

    [container] = template()["spec"]["predictor"]["containers"]
    assert container["command"] == ["ddil", "serve"]
    args = build_parser().parse_args(["serve", *container["args"]])
    assert args.model == template()["metadata"]["annotations"]["ddil.io/model-uri"]
    assert args.http_port == container["ports"][0]["containerPort"] == 8080
    assert args.name == template()["metadata"]["name"]


def test_names_and_model_uris():
    from components.deploy import isvc_name, served_model_uri

    assert isvc_name("ddil-student") == "ddil-student"
    assert isvc_name("SD15_LCM.student") == "sd15-lcm-student"
    assert isvc_name("1st") == "ddil-1st" and len(isvc_name("x" * 100)) <= 45
    kubeflow = {"name": "s", "version": "v3", "uri": "s3://models/s/3"}
    assert served_model_uri(kubeflow, "/tmp/local/student") == "s3://models/s/3"
    local = {"name": "s", "version": 2, "path": "/registry/s/v2", "model_uri": "/registry/s/v2"}
    assert served_model_uri(local, "minio://mlpipeline/v2/artifacts/run/student") == (
        "s3://mlpipeline/v2/artifacts/run/student")  # the artifact in the pipeline root: the same files
    with pytest.raises(ValueError, match="no object-store URI for s version 2"):
        served_model_uri(local, "/tmp/outputs/student")


# ----------------------------------------------------------------------------------------------------------------
# the deploy component against the Kubernetes API stub


@pytest.fixture()
def kube(tmp_path, monkeypatch):
    """The stub and a kubeconfig pointing at it; the kubernetes client's default configuration is put back."""
    from kubernetes import client

    saved = client.Configuration.get_default_copy()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with KubeApiStub(ready_after_gets=2) as stub:
        monkeypatch.setenv("KUBECONFIG", str(stub.kubeconfig(tmp_path / "kubeconfig")))
        yield stub
    client.Configuration.set_default(saved)


def registration(tmp_path, version, uri) -> SimpleNamespace:
    path = tmp_path / f"registration-{version}.json"
    path.write_text(json.dumps({"name": "ddil-student", "version": version, "uri": uri, "registry": "kubeflow"}))
    return SimpleNamespace(path=str(path))


def run_deploy(tmp_path, version, uri, **kw) -> str:
    from components import deploy

    student = SimpleNamespace(path=str(tmp_path / "student"), uri="s3://mlpipeline/artifacts/student", metadata={})
    return deploy.python_func(student=student, registration=registration(tmp_path, version, uri),
                              gpu_type="nvidia.com/gpu", image="registry.example.com/ddil/ddil:0.1.0",
                              namespace="ddil", poll_seconds=0, **kw)


def test_deploy_creates_the_inferenceservice_and_waits_until_ready(kube, tmp_path):
    url = run_deploy(tmp_path, "v1", "s3://ddil-models/registry/ddil-student/v1")
    assert url == "http://ddil-student.ddil.example.com"
    [post] = [r for r in kube.requests if r["method"] == "POST"]
    assert post["path"] == "/apis/serving.kserve.io/v1beta1/namespaces/ddil/inferenceservices"
    assert post["json"] == template()  # the template, filled with this version's values
    assert post["authorization"] == "Bearer stub-token"
    gets = [r for r in kube.requests if r["method"] == "GET"]
    assert len(gets) == 2  # polled until the controller reported Ready


def test_deploy_of_a_new_version_replaces_the_service(kube, tmp_path):
    run_deploy(tmp_path, "v1", "s3://ddil-models/registry/ddil-student/v1")
    first = kube.objects[("ddil", "ddil-student")]
    run_deploy(tmp_path, "v2", "s3://ddil-models/registry/ddil-student/v2")
    methods = [r["method"] for r in kube.requests]
    assert methods.count("POST") == 2 and methods.count("PUT") == 1  # create -> 409 -> get -> replace
    stored = kube.objects[("ddil", "ddil-student")]
    assert stored["metadata"]["generation"] == first["metadata"]["generation"] + 1
    assert stored["metadata"]["labels"]["ddil.io/model-version"] == "v2"
    assert "--model=s3://ddil-models/registry/ddil-student/v2" in stored["spec"]["predictor"]["containers"][0][
        "args"]


def test_deploy_fails_when_the_service_never_becomes_ready(kube, tmp_path):
    kube.ready_after_gets = None
    with pytest.raises(TimeoutError, match="ddil/ddil-student not ready after 0 s: Ready=False pods starting"):
        run_deploy(tmp_path, "v1", "s3://ddil-models/registry/ddil-student/v1", timeout_seconds=0)


def test_deploy_refuses_a_model_the_serving_pod_cannot_read(kube, tmp_path):
    from components import deploy

    student = SimpleNamespace(path="/tmp/x", uri="/tmp/outputs/student", metadata={})
    with pytest.raises(ValueError, match="no object-store URI"):
        deploy.python_func(student=student, registration=registration(tmp_path, "v1", "file:///registry/v1"),
                           gpu_type="nvidia.com/gpu", namespace="ddil")
    assert kube.requests == []  # nothing was applied


def test_the_api_stub_rejects_what_the_schema_rejects(kube):
    from kubernetes import client, config

    config.load_kube_config(os.environ["KUBECONFIG"])
    api = client.CustomObjectsApi()
    bad = template()
    bad["spec"]["predictor"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = [1]
    with pytest.raises(client.ApiException) as info:
        api.create_namespaced_custom_object("serving.kserve.io", "v1beta1", "ddil", "inferenceservices", bad)
    assert info.value.status == 422 and "nvidia.com/gpu" in info.value.body


# ----------------------------------------------------------------------------------------------------------------
# the compiled pipeline


def _spec() -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(PIPELINE_YAML.read_text()))
    return docs[0], docs[1]["platforms"]["kubernetes"]


def _parents(spec: dict) -> dict:
    """component name -> (parent component, the task that runs it)."""
    out = {}
    for comp_name, comp in [("root", spec["root"]), *spec["components"].items()]:
        for task in (comp.get("dag") or {}).get("tasks", {}).values():
            out[task["componentRef"]["name"]] = (comp_name, task)
    return out


def test_compiled_pipeline_deploys_only_behind_the_gates_and_when_asked():
    spec, platform = _spec()
    assert spec["root"]["inputDefinitions"]["parameters"]["deploy"] == {
        "defaultValue": False, "isOptional": True, "parameterType": "BOOLEAN"}
    parents = _parents(spec)
    deploys = [name for name in spec["components"] if name.startswith("comp-deploy")]
    assert sorted(deploys) == ["comp-deploy", "comp-deploy-2"]  # single-pod and multi-node branches
    for name in deploys:
        conditions, comp = [], name
        while comp in parents:
            comp, task = parents[comp]
            if "triggerPolicy" in task:
                conditions.append(task["triggerPolicy"]["condition"])
        assert conditions[0] == "inputs.parameter_values['pipelinechannel--deploy'] == true", conditions
        assert re.fullmatch(r"inputs\.parameter_values\['pipelinechannel--check-gates(-2)?-Output'\] == true",
                            conditions[1]), conditions
        dag, task = parents[name]
        assert task["cachingOptions"].get("enableCache") is not True
        channel = task["inputs"]["artifacts"]["registration"]["componentInputArtifact"]
        assert re.fullmatch(r"pipelinechannel--register(-2)?-registration", channel)
        _, condition = parents[dag]  # the deploy condition's task gets it from the register task beside it
        assert condition["inputs"]["artifacts"][channel]["taskOutputArtifact"]["producerTask"].startswith("register")
        executor = spec["deploymentSpec"]["executors"]["exec-" + name[len("comp-"):]]
        assert "accelerator" not in (executor["container"].get("resources") or {}), "deploy needs no GPU"
        assert "exec-" + name[len("comp-"):] not in platform["deploymentSpec"]["executors"], "no GPU pool, no mounts"
