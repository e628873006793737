"""The Kubeflow Pipelines face: components/, pipelines/ddil.py and the checked-in pipelines/ddil.yaml.

- the compiled YAML runs end to end with kfp's local runner (SubprocessRunner, use_venv=False) on the tiny recipe;
- the YAML's Kubernetes settings: GPU requests, GPU node pool, /dev/shm, volumes, secrets by name only, caching,
  retries, and that every channel a nested task uses is wired through its enclosing groups;
- the checked-in YAML equals a fresh compile (`make compile`);
- `kfp --endpoint URL run create|submit ...` and `kfp pipeline create|create-version` against a local stub of
  the KFP v2beta1 API (tests/kfp_api_stub.py; the real API server needs a cluster);
- the multi-node launcher: the TrainJob / PyTorchJob manifests (cross-checked with k8s/training/) and the
  create / wait / log / delete logic against a fake Kubernetes client.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_YAML = ROOT / "pipelines" / "ddil.yaml"
GPU_EXECUTORS = ("cache-latents", "teacher-rollouts", "distill", "evaluate")
CPU_EXECUTORS = ("resolve-config", "shard-indices", "check-gates", "register", "launch-trainjob", "deploy")


def _docs():
    docs = list(yaml.safe_load_all(PIPELINE_YAML.read_text()))
    assert len(docs) == 2, "expected the pipeline spec and the platform spec (kfp-kubernetes)"
    return docs[0], docs[1]["platforms"]["kubernetes"]


def _executors(spec: dict, stage: str) -> dict:
    """exec-<stage> and its numbered copies (exec-<stage>-2: the multi-node branch)."""
    found = {name: e for name, e in spec["deploymentSpec"]["executors"].items()
             if re.fullmatch(rf"exec-{stage}(-\d+)?", name)}
    assert found, f"no executor for {stage}"
    return found


def _all_tasks(spec: dict):
    """(component name, task name, task) for every task of every DAG (root and nested groups)."""
    for comp_name, comp in [("root", spec["root"]), *spec["components"].items()]:
        for task_name, task in (comp.get("dag") or {}).get("tasks", {}).items():
            yield comp_name, task_name, task


def _tasks_of(spec: dict, component: str) -> list[tuple[str, dict]]:
    """The tasks (in any DAG) that run comp-<component> or its numbered copies."""
    return [(name, task) for _, name, task in _all_tasks(spec)
            if re.fullmatch(rf"comp-{component}(-\d+)?", task["componentRef"]["name"])]


# ----------------------------------------------------------------------------------------------------------------
# (c) the checked-in YAML is what `make compile` writes


def test_checked_in_yaml_matches_a_fresh_compile(tmp_path):
    out = tmp_path / "ddil.yaml"
    env = {k: v for k, v in os.environ.items() if k != "DDIL_IMAGE"}  # the checked-in YAML uses the default image
    proc = subprocess.run([sys.executable, "-m", "pipelines.ddil", "--output", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == PIPELINE_YAML.read_text(), (
        "pipelines/ddil.yaml is stale: run `make compile` and commit the result")


def test_makefile_compile_target_regenerates_the_yaml():
    text = (ROOT / "Makefile").read_text()
    match = re.search(r"^compile:.*\n((?:\t.*\n)+)", text, re.M)
    assert match and "-m pipelines.ddil" in match.group(1)


def test_image_is_overridable_at_compile_time(tmp_path):
    out = tmp_path / "ddil.yaml"
    env = dict(os.environ, DDIL_IMAGE="example.org/team/ddil:test")
    proc = subprocess.run([sys.executable, "-m", "pipelines.ddil", "--output", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"example.org/team/ddil:test"}


# ----------------------------------------------------------------------------------------------------------------
# (b) what the YAML asks of Kubernetes


def test_pipeline_parameters():
    spec, _ = _docs()
    params = spec["root"]["inputDefinitions"]["parameters"]
    expected = {
        "teacher": "STRING", "dataset": "STRING", "recipe": "STRING", "overrides": "LIST", "objective": "STRING",
        "student_steps": "NUMBER_INTEGER", "prior_forward": "NUMBER_DOUBLE", "prior_teacher": "NUMBER_DOUBLE",
        "prior_student": "NUMBER_DOUBLE", "num_shards": "NUMBER_INTEGER", "gpu_type": "STRING",
        "gpu_count": "NUMBER_INTEGER", "registry_uri": "STRING", "kubeflow_registry_address": "STRING",
        "fid_factor": "NUMBER_DOUBLE", "min_coverage": "NUMBER_DOUBLE", "min_adherence": "NUMBER_DOUBLE",
        "pushgateway": "STRING", "multi_node": "BOOLEAN", "num_nodes": "NUMBER_INTEGER",
        "training_operator": "STRING", "deploy": "BOOLEAN",
    }
    assert {k: v["parameterType"] for k, v in params.items()} == expected
    assert all("defaultValue" in v for v in params.values()), "every parameter has a default (no optional inputs)"
    assert params["recipe"]["defaultValue"] == "tiny" and params["multi_node"]["defaultValue"] is False
    assert params["deploy"]["defaultValue"] is False  # serving is opt-in (tests/test_deploy.py)
    assert spec["pipelineInfo"]["name"] == "ddil"


def test_components_run_on_the_ddil_image_and_install_nothing():
    from components import DEFAULT_IMAGE

    spec, _ = _docs()
    for name, executor in spec["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert container["image"] == DEFAULT_IMAGE, name
        script = " ".join(container["command"] + container.get("args", []))
        assert "pip install" not in script, f"{name} installs packages at run time"
        assert "kfp.dsl.executor_main" in script


def test_gpu_stages_request_gpus_from_pipeline_parameters():
    spec, _ = _docs()
    for stage in GPU_EXECUTORS:
        for name, executor in _executors(spec, stage).items():
            acc = executor["container"]["resources"]["accelerator"]
            assert acc["resourceType"] == "{{$.inputs.parameters['pipelinechannel--gpu_type']}}", name
            assert acc["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpu_count']}}", name
    for stage in CPU_EXECUTORS:
        for name, executor in _executors(spec, stage).items():
            assert "accelerator" not in (executor["container"].get("resources") or {}), name


def test_gpu_stages_target_the_gpu_pool_with_shm_cache_and_credentials():
    spec, platform = _docs()
    k8s = platform["deploymentSpec"]["executors"]
    for stage in GPU_EXECUTORS:
        for name in _executors(spec, stage):
            cfg = k8s[name]
            assert cfg["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}, name
            assert cfg["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            assert {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                    "sizeLimit": "16Gi"} in cfg["emptyDirMounts"], name
            pvc = [m for m in cfg["pvcMount"] if m["mountPath"] == "/cache/huggingface"]
            assert pvc and pvc[0]["pvcNameParameter"]["runtimeValue"]["constant"] == "hf-cache", name
            env = spec["deploymentSpec"]["executors"][name]["container"]["env"]
            assert {"name": "HF_HOME", "value": "/cache/huggingface"} in env, name
            secrets = {s["secretNameParameter"]["runtimeValue"]["constant"]: s for s in cfg["secretAsEnv"]}
            s3 = secrets["ddil-s3-credentials"]
            assert {(k["secretKey"], k["envVar"]) for k in s3["keyToEnv"]} == {
                ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
                ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL")}
            assert s3["optional"] is True
            assert secrets["ddil-hf-token"]["keyToEnv"] == [{"secretKey": "HF_TOKEN", "envVar": "HF_TOKEN"}]


def test_cpu_stages_stay_off_the_gpu_pool():
    spec, platform = _docs()
    k8s = platform["deploymentSpec"]["executors"]
    for stage in CPU_EXECUTORS:
        for name in _executors(spec, stage):
            cfg = k8s.get(name, {})
            for key in ("nodeSelector", "tolerations", "emptyDirMounts"):
                assert key not in cfg, f"{name} has {key}"
    for name in _executors(spec, "register"):
        names = [s["secretNameParameter"]["runtimeValue"]["constant"] for s in k8s[name]["secretAsEnv"]]
        assert names == ["ddil-s3-credentials"]  # the registry may live on S3
    for name in _executors(spec, "launch-trainjob"):
        mounts = k8s[name]["pvcMount"]
        assert [(m["pvcNameParameter"]["runtimeValue"]["constant"], m["mountPath"]) for m in mounts] == [
            ("ddil-data", "/data")]


def test_caching_and_retries():
    spec, _ = _docs()

    def caching(task):
        return bool(task.get("cachingOptions", {}).get("enableCache"))

    for stage, cached, retried in (("cache-latents", True, True), ("teacher-rollouts", True, True),
                                   ("distill", False, False), ("launch-trainjob", False, False),
                                   ("evaluate", True, True), ("register", False, True),
                                   ("resolve-config", False, False), ("check-gates", False, False)):
        tasks = _tasks_of(spec, stage)
        assert tasks, stage
        for name, task in tasks:
            assert caching(task) is cached, f"{name}: caching should be {cached}"
            if retried:
                assert task["retryPolicy"]["maxRetryCount"] == 2, name
                assert task["retryPolicy"]["backoffDuration"] == "60s", name
            else:
                assert "retryPolicy" not in task, name


def test_fan_out_collect_and_conditions():
    spec, _ = _docs()
    comps = spec["components"]
    loops = [c for c in comps.values() for t in (c.get("dag") or {}).get("tasks", {}).values()
             if t.get("parameterIterator")]
    assert len(loops) == 2, "one teacher-rollouts ParallelFor per distill branch"
    for comp in loops:
        for task in comp["dag"]["tasks"].values():
            if task.get("parameterIterator"):
                assert task["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--shard-indices-Output"
    for name, task in _tasks_of(spec, "distill") + _tasks_of(spec, "launch-trainjob"):
        source = task["inputs"]["artifacts"]["rollouts"]["taskOutputArtifact"]  # dsl.Collected: the loop's output
        loop = next(c for c in comps.values() for t_name, t in (c.get("dag") or {}).get("tasks", {}).items()
                    if t_name == source["producerTask"])
        loop_comp = comps[loop["dag"]["tasks"][source["producerTask"]]["componentRef"]["name"]]
        collected = loop_comp["outputDefinitions"]["artifacts"][source["outputArtifactKey"]]
        assert collected["isArtifactList"] is True, name
        [selector] = loop_comp["dag"]["outputs"]["artifacts"][source["outputArtifactKey"]]["artifactSelectors"]
        assert selector["producerSubtask"].startswith("teacher-rollouts"), name
    branches = spec["root"]["dag"]["tasks"]["condition-branches-1"]
    conditions = [t["triggerPolicy"]["condition"] for c in [comps[branches["componentRef"]["name"]]]
                  for t in c["dag"]["tasks"].values()]
    assert any("multi_node" in c and "== false" in c for c in conditions)
    gates = [t for _, t in _tasks_of(spec, "register")]
    assert len(gates) == 2
    gate_conditions = [t["triggerPolicy"]["condition"] for c in comps.values()
                       for t in (c.get("dag") or {}).get("tasks", {}).values()
                       if "check-gates" in t.get("triggerPolicy", {}).get("condition", "")]
    assert len(gate_conditions) == 2 and all("== true" in c for c in gate_conditions)


def test_every_channel_a_task_uses_is_wired_through_its_groups():
    """Each componentInputParameter / Artifact a DAG task reads is an input of that DAG, and each placeholder in a
    task input (the GPU resources) names one of the task's inputs: kfp 2.17 does not wire channels used only by
    resource placeholders into nested groups by itself (pipelines/ddil.py registers them)."""
    spec, _ = _docs()
    comps = {"root": spec["root"], **spec["components"]}
    for comp_name, comp in comps.items():
        dag = comp.get("dag")
        if not dag:
            continue
        declared = comp.get("inputDefinitions", {})
        params = set(declared.get("parameters", {}))
        artifacts = set(declared.get("artifacts", {}))
        for task_name, task in dag["tasks"].items():
            inputs = task.get("inputs", {})
            for key, value in inputs.get("parameters", {}).items():
                if "componentInputParameter" in value:
                    assert value["componentInputParameter"] in params, (comp_name, task_name, key)
                constant = value.get("runtimeValue", {}).get("constant")
                if isinstance(constant, str):
                    for ref in re.findall(r"inputs\.parameters\['([^']+)'\]", constant):
                        assert ref in inputs["parameters"], (comp_name, task_name, ref)
            for key, value in inputs.get("artifacts", {}).items():
                if "componentInputArtifact" in value:
                    assert value["componentInputArtifact"] in artifacts, (comp_name, task_name, key)


def test_no_credentials_in_the_yaml():
    text = PIPELINE_YAML.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id"
    assert "REPLACE_ME" not in text
    assert not re.search(r"\bhf_[A-Za-z0-9]{30,}\b", text), "a Hugging Face token"
    spec, platform = _docs()
    for name, executor in spec["deploymentSpec"]["executors"].items():
        for env in executor["container"].get("env", []):
            assert env["name"] == "HF_HOME", f"{name}: unexpected env {env['name']}"
    for name, cfg in platform["deploymentSpec"]["executors"].items():
        for secret in cfg.get("secretAsEnv", []):
            assert set(secret) <= {"secretName", "secretNameParameter", "keyToEnv", "optional"}, name
            for pair in secret["keyToEnv"]:
                assert set(pair) == {"secretKey", "envVar"}
    for line in text.splitlines():  # nothing looks like `aws_secret_access_key: <value>` / `password: ...`
        assert not re.search(r"(?i)(secret_access_key|password|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{16,}", line), line


# ----------------------------------------------------------------------------------------------------------------
# helpers and small components, called directly


def test_pipeline_overrides_keep_the_recipe_unless_set():
    from components.config import pipeline_overrides

    assert pipeline_overrides(["training.steps=3"]) == ["training.steps=3"]
    out = pipeline_overrides([], teacher="tiny://sd15", dataset="s3://b/it's", objective="pd", student_steps=1,
                             prior_forward=1, prior_teacher=0, prior_student=0.0, fid_factor=1.5, min_coverage=-1,
                             registry_uri="s3://reg", kubeflow_registry_address="", pushgateway="pg:9091")
    assert out == ["model.teacher='tiny://sd15'", "data.dataset='s3://b/it''s'", "objective.name='pd'",
                   "registry.uri='s3://reg'", "telemetry.pushgateway='pg:9091'", "objective.student_steps=1",
                   "ddil.priors.forward=1.0", "ddil.priors.teacher=0.0", "ddil.priors.student=0.0",
                   "registry.gates.fid_factor=1.5"]
    from ddil_core.config import load_config

    config = load_config("tiny", out)
    assert config.data.dataset == "s3://b/it's" and config.registry.gates.fid_factor == 1.5
    assert config.registry.gates.min_coverage is None and config.ddil.priors.forward == 1.0


def test_stage_config_accepts_a_recipe_name_a_path_or_yaml_text():
    from components.common import stage_config

    assert stage_config("tiny", []).objective.student_steps == 2
    assert stage_config(str(ROOT / "configs" / "tiny.yaml"), ["training.steps=3"]).training.steps == 3
    text = "model: {teacher: 'tiny://sdxl'}\ntraining:\n  steps: 7\n"
    config = stage_config(text, ["training.lr=0.001"])
    assert config.model.teacher == "tiny://sdxl" and config.training.steps == 7 and config.training.lr == 0.001
    from ddil_core.config import ConfigError

    with pytest.raises(ConfigError, match="did you mean"):
        stage_config("tiny", ["training.stepz=3"])


def test_resolve_config_validates_and_shard_indices(tmp_path):
    from ddil_core.config import ConfigError

    from components import resolve_config, shard_indices

    out = SimpleNamespace(path=str(tmp_path / "resolved.yaml"), metadata={})
    kwargs = dict(recipe="tiny", overrides=["training.steps=3"], teacher="", dataset="", objective="",
                  student_steps=-1, prior_forward=-1.0, prior_teacher=-1.0, prior_student=-1.0, registry_uri="",
                  kubeflow_registry_address="", fid_factor=-1.0, min_coverage=0.5, min_adherence=-1.0,
                  pushgateway="")
    merged = resolve_config.python_func(resolved_config=out, **kwargs)
    assert merged == ["training.steps=3", "registry.gates.min_coverage=0.5"]
    assert yaml.safe_load(Path(out.path).read_text())["training"]["steps"] == 3
    with pytest.raises(ConfigError, match="sum to 1"):
        resolve_config.python_func(resolved_config=out, **dict(kwargs, prior_forward=0.9))
    assert shard_indices.python_func(num_shards=3) == [0, 1, 2]
    with pytest.raises(ValueError):
        shard_indices.python_func(num_shards=0)


def test_check_gates_component(tmp_path, capsys):
    from components import check_gates

    metrics = {"models": {"student": {"fid": 12.0, "coverage": 0.4}, "teacher": {"fid": 10.0}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    evaluation = SimpleNamespace(path=str(tmp_path))
    assert check_gates.python_func(recipe="tiny", overrides=[], evaluation=evaluation) is True  # no gates
    assert check_gates.python_func(recipe="tiny", overrides=["registry.gates.fid_factor=1.5"],
                                   evaluation=evaluation) is True
    assert check_gates.python_func(recipe="tiny", overrides=["registry.gates.fid_factor=1.1",
                                                             "registry.gates.min_coverage=0.3"],
                                   evaluation=evaluation) is False
    out = capsys.readouterr().out
    assert "FAIL gate fid_factor" in out and "PASS gate min_coverage" in out


def test_inline_images_makes_reports_self_contained(tmp_path):
    from components.common import inline_images

    (tmp_path / "a b.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (tmp_path / "sub").mkdir()
    html = '<img src="a%20b.png" alt="x"><img src="https://example.org/y.png"><img src="missing.png">'
    out = inline_images(html, str(tmp_path))
    assert 'src="data:image/png;base64,iVBORw0KGgpmYWtl"' in out
    assert 'src="https://example.org/y.png"' in out and 'src="missing.png"' in out
    md = "![grid](a%20b.png)\n![up](../etc/passwd.png)\n"
    assert inline_images(md, str(tmp_path)).startswith("![grid](data:image/png;base64,")
    assert "](../etc/passwd.png)" in inline_images(md, str(tmp_path))


def test_student_scalars():
    from components.common import student_scalars

    metrics = {"models": {"student": {"fid": 3.5, "coverage": None, "steps": 4, "ok": True, "x": float("nan"),
                                      "name": "s"},
                          "teacher": {"fid": 2.0}, "baseline": {"fid": 9.0}}}
    assert student_scalars(metrics) == {"fid": 3.5, "steps": 4.0, "teacher_fid": 2.0}


# ----------------------------------------------------------------------------------------------------------------
# (d) `kfp run create` / `run submit` / `pipeline create` against the API stub


def _json_out(proc: subprocess.CompletedProcess) -> dict:
    """The JSON object `kfp --output json ...` prints after its "... details: URL" line."""
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def _kfp(stub_url: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOME=str(home))  # no ~/.config/kfp/context.json of the machine
    env.pop("KF_PIPELINES_ENDPOINT", None)
    return subprocess.run(["kfp", "--endpoint", stub_url, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture()
def api_stub():
    from tests.kfp_api_stub import KfpApiStub

    with KfpApiStub() as stub:
        yield stub


RUN_ARGS = ("teacher=tiny://sd15", "dataset=demo://digits", "num_shards=4", 'overrides=["training.steps=100"]',
            "multi_node=true", "num_nodes=3", "gpu_count=8", "fid_factor=1.5", "prior_forward=0.5")
RUN_PARAMS = {"teacher": "tiny://sd15", "dataset": "demo://digits", "num_shards": 4,
              "overrides": ["training.steps=100"], "multi_node": True, "num_nodes": 3, "gpu_count": 8,
              "fid_factor": 1.5, "prior_forward": 0.5}


@pytest.mark.parametrize("verb", ["create", "submit"])
def test_kfp_cli_run_sends_the_pipeline_and_parameters(api_stub, tmp_path, verb):
    proc = _kfp(api_stub.url, tmp_path, "run", verb, "-e", "ddil", "-r", "tiny-smoke", "-f",
                "pipelines/ddil.yaml", *RUN_ARGS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PENDING" in proc.stdout
    [post] = api_stub.calls("POST", "/runs")
    body = post["json"]
    assert body["display_name"] == "tiny-smoke"
    [exp] = api_stub.experiments.values()
    assert exp["display_name"] == "ddil" and body["experiment_id"] == exp["experiment_id"]
    assert body["runtime_config"]["parameters"] == RUN_PARAMS
    spec, platform = _docs()
    sent = body["pipeline_spec"]
    assert sent["pipeline_spec"]["pipelineInfo"] == spec["pipelineInfo"]
    assert sent["pipeline_spec"]["root"]["inputDefinitions"] == json.loads(json.dumps(
        spec["root"]["inputDefinitions"]))
    assert set(sent["pipeline_spec"]["deploymentSpec"]["executors"]) == set(spec["deploymentSpec"]["executors"])
    sent_k8s = sent["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert sent_k8s["exec-distill"]["nodeSelector"] == platform["deploymentSpec"]["executors"]["exec-distill"][
        "nodeSelector"]
    assert api_stub.calls("GET", f"/runs/{api_stub.runs and next(iter(api_stub.runs))}")
    if verb == "submit":
        assert "deprecated" in proc.stderr


def test_kfp_cli_rejects_unknown_or_mistyped_parameters(api_stub, tmp_path):
    proc = _kfp(api_stub.url, tmp_path, "run", "create", "-e", "ddil", "-f", "pipelines/ddil.yaml",
                "teacher=tiny://sd15", "num_shardz=4")
    assert proc.returncode != 0 and "num_shardz" in proc.stdout + proc.stderr
    proc = _kfp(api_stub.url, tmp_path, "run", "create", "-e", "ddil", "-f", "pipelines/ddil.yaml",
                "num_shards=four")
    assert proc.returncode != 0 and "num_shards" in proc.stdout + proc.stderr
    assert not api_stub.runs


def test_kfp_cli_upload_version_and_run_from_it(api_stub, tmp_path):
    proc = _kfp(api_stub.url, tmp_path, "--output", "json", "pipeline", "create", "-p", "ddil",
                "pipelines/ddil.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pipeline_id = _json_out(proc)["pipeline_id"]
    [upload] = api_stub.calls("POST", "/pipelines/upload")
    assert upload["files"]["uploadfile"]["data"] == PIPELINE_YAML.read_bytes()
    proc = _kfp(api_stub.url, tmp_path, "--output", "json", "pipeline", "create-version", "-n", "ddil",
                "-v", "ddil-v2", "pipelines/ddil.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    version_id = _json_out(proc)["pipeline_version_id"]
    proc = _kfp(api_stub.url, tmp_path, "run", "create", "-e", "ddil", "-p", pipeline_id, "-v", version_id,
                "teacher=tiny://sd15", "num_shards=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [post] = api_stub.calls("POST", "/runs")
    assert post["json"]["pipeline_version_reference"] == {"pipeline_id": pipeline_id,
                                                          "pipeline_version_id": version_id}
    assert post["json"]["runtime_config"]["parameters"] == {"teacher": "tiny://sd15", "num_shards": 2}


# ----------------------------------------------------------------------------------------------------------------
# multi-node launcher: manifests and the job lifecycle


def _template(name: str) -> dict:
    return yaml.safe_load((ROOT / "k8s" / "training" / name).read_text())


def _job_args():
    from components.trainjob import distill_job_args

    return distill_job_args("/data/ddil-runs/x/config.yaml", "/data/ddil-runs/x/latents",
                            "/data/ddil-runs/x/rollouts", "/data/ddil-runs/x/distill")


def test_trainjob_manifest_matches_the_k8s_template():
    from components.trainjob import distill_job_name, trainjob_manifest

    name = distill_job_name("run-123")
    assert re.fullmatch(r"ddil-distill-[0-9a-f]{10}", name) and name == distill_job_name("run-123")
    job = trainjob_manifest(name, "ddil", "img:1", 4, 8, "nvidia.com/gpu", _job_args())
    template = _template("trainjob.yaml")
    assert job["apiVersion"] == template["apiVersion"] and job["kind"] == "TrainJob"
    assert job["spec"]["runtimeRef"] == template["spec"]["runtimeRef"]
    assert job["metadata"]["labels"] == template["metadata"]["labels"]
    trainer = job["spec"]["trainer"]
    assert trainer["command"] == template["spec"]["trainer"]["command"]  # the same accelerate launch script
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8 and trainer["image"] == "img:1"
    assert trainer["resourcesPerNode"] == {"requests": {"nvidia.com/gpu": 8}, "limits": {"nvidia.com/gpu": 8}}
    assert trainer["args"][0] == "distill"
    with pytest.raises(ValueError):
        trainjob_manifest(name, "ddil", "img:1", 0, 8, "nvidia.com/gpu", _job_args())


def test_pytorchjob_manifest_matches_the_k8s_template():
    import kubernetes_validate

    from components.trainjob import pytorchjob_manifest

    job = pytorchjob_manifest("ddil-distill-abc", "ddil", "img:1", 3, 4, "nvidia.com/gpu", _job_args())
    template = _template("pytorchjob.yaml")
    assert job["apiVersion"] == template["apiVersion"] and job["kind"] == "PyTorchJob"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert job["spec"]["nprocPerNode"] == "4" and job["spec"]["runPolicy"] == template["spec"]["runPolicy"]
    mine, theirs = replicas["Worker"]["template"]["spec"], template["spec"]["pytorchReplicaSpecs"]["Worker"][
        "template"]["spec"]
    for key in ("serviceAccountName", "terminationGracePeriodSeconds", "nodeSelector", "tolerations",
                "securityContext", "volumes"):
        assert mine[key] == theirs[key], key
    c, t = mine["containers"][0], theirs["containers"][0]
    for key in ("name", "command", "envFrom", "ports", "securityContext", "volumeMounts"):
        assert c[key] == t[key], key
    assert {e["name"]: e["value"] for e in c["env"]} == {"DDIL_NNODES": "3", "DDIL_NPROC_PER_NODE": "4"}
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 4}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": dict(mine, restartPolicy="Never")}
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    single = pytorchjob_manifest("n", "ddil", "img:1", 1, 1, "nvidia.com/gpu", _job_args())
    assert set(single["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_job_args_are_a_valid_ddil_distill_command_line():
    from ddil_core.cli import build_parser

    args = build_parser().parse_args(_job_args())
    assert args.command == "distill" and args.rollouts == ["/data/ddil-runs/x/rollouts"]
    assert args.set == ["telemetry.metrics_port=9100"]


def test_accelerate_distill_command():
    from components.stages import accelerate_distill_command

    one = accelerate_distill_command(1, "c.yaml", "lat", ["r0"], "out")
    assert one == ["accelerate", "launch", "--num_machines", "1", "--num_processes", "1", "-m", "ddil_core.cli",
                   "distill", "--config=c.yaml", "--latents=lat", "--rollouts=r0", "--out=out"]
    assert "--multi_gpu" in accelerate_distill_command(4, "c.yaml", "lat", [], "out")


def test_launch_script_rejects_an_unknown_operator():
    from components.trainjob import accelerate_launch_script

    with pytest.raises(ValueError, match="training_operator"):
        accelerate_launch_script("v3")


class FakeApiError(Exception):
    def __init__(self, status):
        super().__init__(f"({status})")
        self.status = status


class FakeCluster:
    """CustomObjectsApi + CoreV1Api doubles: a job whose status follows `states` on successive reads."""

    def __init__(self, states, logs=None, exists=False, fail_get_at=None):
        self.states = list(states)
        self.logs = logs or {}
        self.exists = exists
        self.fail_get_at = fail_get_at
        self.calls = []
        self.gets = 0
        self.created = None

    # CustomObjectsApi
    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", group, version, namespace, plural, body["metadata"]["name"]))
        if self.exists:
            raise FakeApiError(409)
        self.exists = True
        self.created = body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", name))
        if not self.exists:
            raise FakeApiError(404)
        self.gets += 1
        if self.fail_get_at == self.gets:
            raise KeyboardInterrupt
        conditions = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"metadata": {"name": name}, "status": {"conditions": conditions}}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, propagation_policy=None):
        self.calls.append(("delete", name, propagation_policy))
        if not self.exists:
            raise FakeApiError(404)
        self.exists = False

    # CoreV1Api
    def list_namespaced_pod(self, namespace, label_selector=None):
        self.calls.append(("pods", label_selector))
        pods = [SimpleNamespace(metadata=SimpleNamespace(name=n)) for n in self.logs]
        return SimpleNamespace(items=pods)

    def read_namespaced_pod_log(self, name, namespace, timestamps=False, since_seconds=None):
        assert timestamps  # the launcher dedupes by timestamp
        reads = self.logs[name]  # successive reads: each a list of lines (the last one repeats)
        return "\n".join(reads.pop(0) if len(reads) > 1 else reads[0])


RUNNING = [{"type": "Created", "status": "True"}]
COMPLETE = [{"type": "Created", "status": "True"}, {"type": "Complete", "status": "True", "reason": "JobsCompleted",
                                                    "message": "all nodes finished"}]
FAILED = [{"type": "Created", "status": "True"}, {"type": "Failed", "status": "True", "reason": "JobFailed",
                                                  "message": "node-0 exited with 2"}]


def _run(cluster, manifest, **kw):
    from components.trainjob import run_training_job

    lines, clock = [], iter(range(0, 10_000, 30))
    result = run_training_job(cluster, cluster, manifest, poll_seconds=30, log=lines.append,
                              sleep=lambda s: None, clock=lambda: next(clock), **kw)
    return result, lines


def _trainjob():
    from components.trainjob import trainjob_manifest

    return trainjob_manifest("ddil-distill-abc", "ddil", "img:1", 2, 8, "nvidia.com/gpu", _job_args())


def test_run_training_job_succeeds_streams_logs_once_and_deletes_the_job():
    logs = {"ddil-distill-abc-node-0-0-x": [
        ["2026-11-24T10:00:00.1Z step 1", "2026-11-24T10:00:00.12Z step 2"],
        ["2026-11-24T10:00:00.12Z step 2", "2026-11-24T10:00:01Z step 3"]]}
    cluster = FakeCluster([RUNNING, RUNNING, COMPLETE], logs=logs)
    job, lines = _run(cluster, _trainjob())
    assert job["status"]["conditions"] == COMPLETE
    assert cluster.calls[0] == ("create", "trainer.kubeflow.org", "v1alpha1", "ddil", "trainjobs", "ddil-distill-abc")
    assert cluster.calls[-1] == ("delete", "ddil-distill-abc", "Background") and not cluster.exists
    assert ("pods", "jobset.sigs.k8s.io/jobset-name=ddil-distill-abc") in cluster.calls
    streamed = [line for line in lines if line.startswith("[ddil-distill-abc-node")]
    assert streamed == ["[ddil-distill-abc-node-0-0-x] step 1", "[ddil-distill-abc-node-0-0-x] step 2",
                        "[ddil-distill-abc-node-0-0-x] step 3"]
    assert any("succeeded" in line for line in lines)


def test_run_training_job_fails_the_task_when_the_job_fails_and_still_deletes_it():
    cluster = FakeCluster([RUNNING, FAILED])
    with pytest.raises(RuntimeError, match="failed: JobFailed: node-0 exited with 2"):
        _run(cluster, _trainjob())
    assert cluster.calls[-1][0] == "delete" and not cluster.exists


def test_run_training_job_times_out_and_deletes():
    cluster = FakeCluster([RUNNING])
    with pytest.raises(TimeoutError):
        _run(cluster, _trainjob(), timeout_seconds=100)
    assert cluster.calls[-1][0] == "delete" and not cluster.exists


def test_run_training_job_deletes_on_interruption():
    cluster = FakeCluster([RUNNING], fail_get_at=2)
    with pytest.raises(KeyboardInterrupt):
        _run(cluster, _trainjob())
    assert cluster.calls[-1][0] == "delete" and not cluster.exists


def test_run_training_job_replaces_a_job_left_by_an_earlier_attempt():
    from components.trainjob import pytorchjob_manifest

    cluster = FakeCluster([[{"type": "Running", "status": "True"}], [{"type": "Succeeded", "status": "True"}]],
                          exists=True)
    manifest = pytorchjob_manifest("ddil-distill-abc", "ddil", "img:1", 2, 1, "nvidia.com/gpu", _job_args())
    original_create = cluster.create_namespaced_custom_object
    attempts = []

    def create(*args):
        attempts.append(cluster.exists)
        return original_create(*args)

    cluster.create_namespaced_custom_object = create
    _, lines = _run(cluster, manifest)
    assert attempts == [True, False]  # 409, deleted, created again
    assert ("pods", "training.kubeflow.org/job-name=ddil-distill-abc") in cluster.calls
    assert any("replacing" in line for line in lines)
    assert cluster.calls[-1][0] == "delete" and not cluster.exists


@pytest.mark.parametrize("operator, kind", [("v2", "TrainJob"), ("v1", "PyTorchJob")])
def test_launch_trainjob_component_stages_runs_and_returns_the_student(tmp_path, monkeypatch, operator, kind):
    """The component body with a fake cluster whose job 'trains' by writing a student into its --out folder."""
    import kubernetes

    from components import launch_trainjob

    class TrainingCluster(FakeCluster):
        def create_namespaced_custom_object(self, group, version, namespace, plural, body):
            super().create_namespaced_custom_object(group, version, namespace, plural, body)
            spec = body["spec"]
            if kind == "TrainJob":
                args = spec["trainer"]["args"]
            else:
                args = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
            opts = dict(a[2:].split("=", 1) for a in args[1:] if a.startswith("--") and "=" in a)
            assert Path(opts["latents"], "manifest.json").is_file()
            assert sorted(p.name for p in Path(opts["rollouts"]).iterdir()) == ["shard-0000", "shard-0001"]
            assert yaml.safe_load(Path(opts["config"]).read_text())["training"]["steps"] == 3
            student_dir = Path(opts["out"], "student")
            student_dir.mkdir(parents=True)
            (student_dir / "model_index.json").write_text("{}")
            (student_dir / "ddil_student.json").write_text(json.dumps({"num_inference_steps": 2}))
            Path(opts["out"], "train_log.jsonl").write_text('{"step": 1}\n')

    cluster = TrainingCluster([COMPLETE] if kind == "TrainJob" else [[{"type": "Succeeded", "status": "True"}]])
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", lambda *a: cluster)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda *a: cluster)

    def folder(name, files):
        path = tmp_path / "inputs" / name
        path.mkdir(parents=True)
        for f in files:
            (path / f).write_text("x")
        return SimpleNamespace(path=str(path))

    student = SimpleNamespace(path=str(tmp_path / "out" / "student"), metadata={})
    training_log = SimpleNamespace(path=str(tmp_path / "out" / "training_log"), metadata={})
    shared = tmp_path / "data" / "ddil-runs"
    import signal

    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the component's SIGTERM handler, not in pytest
    launch_trainjob.python_func(
        recipe="tiny", overrides=["training.steps=3"], latents=folder("latents", ["manifest.json"]),
        rollouts=[folder("r0", ["manifest.json"]), folder("r1", ["manifest.json"])], num_nodes=2,
        gpu_type="nvidia.com/gpu", gpu_count=8, training_operator=operator, run_id="run-1", student=student,
        training_log=training_log, image="img:1", namespace="ddil", shared_root=str(shared), poll_seconds=0)
    assert (Path(student.path) / "model_index.json").is_file()
    assert (Path(training_log.path) / "train_log.jsonl").is_file()
    assert student.metadata["steps"] == 2 and student.metadata["training_job"].startswith(f"{kind}/ddil-distill-")
    assert cluster.created["kind"] == kind and cluster.calls[-1][0] == "delete"
    assert list(shared.iterdir()) == [], "the staged job folder is removed after success"


def test_job_state_reads_both_operators():
    from components.trainjob import job_state

    assert job_state({}) == ("Running", "Pending")
    assert job_state({"status": {"conditions": COMPLETE}})[0] == "Succeeded"
    assert job_state({"status": {"conditions": [{"type": "Succeeded", "status": "True"}]}})[0] == "Succeeded"
    assert job_state({"status": {"conditions": FAILED}}) == ("Failed", "JobFailed: node-0 exited with 2")
    assert job_state({"status": {"conditions": [{"type": "Failed", "status": "False"}]}})[0] == "Running"


# ----------------------------------------------------------------------------------------------------------------
# (a) the compiled pipeline, end to end, with kfp's local runner


LOCAL_RUN_OVERRIDES = [
    "data.limit=32", "rollouts.num_samples=8", "training.steps=2", "training.checkpoint_every=2",
    "evaluation.num_prompts=2", "evaluation.images_per_prompt=3", "evaluation.teacher_steps=4", "evaluation.k=2",
]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    from kfp import components as kfp_components
    from kfp import local

    root = tmp_path_factory.mktemp("kfp-local")
    warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*", category=RuntimeWarning)
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*", category=UserWarning)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "pipeline-root"),
               raise_on_error=True)
    pipeline = kfp_components.load_component_from_file(str(PIPELINE_YAML))  # the checked-in YAML itself
    start = time.monotonic()
    pipeline(teacher="tiny://sd15", dataset="demo://digits", recipe="tiny", overrides=LOCAL_RUN_OVERRIDES,
             num_shards=2, registry_uri=str(root / "registry"), fid_factor=1000.0, min_coverage=0.0)
    elapsed = time.monotonic() - start
    [run_dir] = (root / "pipeline-root").iterdir()
    yield SimpleNamespace(dir=run_dir, registry=root / "registry", elapsed=elapsed)
    from kfp.local import config as local_config

    local_config.LocalExecutionConfig.instance = None  # later tests get components that do not run on call


def _executor_output(run_dir: Path, task: str) -> dict:
    return json.loads((run_dir / task / "executor_output.json").read_text())


def _artifact(output: dict, name: str) -> dict:
    [artifact] = output["artifacts"][name]["artifacts"]
    return artifact


@pytest.mark.slow
def test_local_run_every_task_succeeds(local_run):
    run_dir = local_run.dir
    tasks = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("executor_output.json"))
    assert tasks == [
        "cache-latents/executor_output.json", "check-gates/executor_output.json",
        "distill/executor_output.json", "evaluate/executor_output.json",
        "for-loop-2-iteration-0/teacher-rollouts/executor_output.json",
        "for-loop-2-iteration-1/teacher-rollouts/executor_output.json",
        "register/executor_output.json", "resolve-config/executor_output.json",
        "shard-indices/executor_output.json",
    ], "the single-pod branch ran every task (and the multi-node branch none)"
    print(f"local pipeline run: {local_run.elapsed:.0f} s")


@pytest.mark.slow
def test_local_run_fans_out_and_collects_the_rollouts(local_run):
    shards = [_artifact(_executor_output(local_run.dir, f"for-loop-2-iteration-{i}/teacher-rollouts"), "rollouts")
              for i in range(2)]
    assert [s["metadata"]["shard"] for s in shards] == [0, 1]
    assert sum(s["metadata"]["count"] for s in shards) == 8
    student = _artifact(_executor_output(local_run.dir, "distill"), "student")
    assert student["metadata"]["rollout_shards"] == 2


@pytest.mark.slow
def test_local_run_model_and_metrics_artifacts(local_run):
    student = _artifact(_executor_output(local_run.dir, "distill"), "student")
    folder = Path(student["uri"])
    assert (folder / "model_index.json").is_file() and (folder / "ddil_student.json").is_file()
    assert student["metadata"]["steps"] == 2 and student["metadata"]["objective"] == "pd"
    assert student["metadata"]["framework"] == "diffusers"
    log = Path(_artifact(_executor_output(local_run.dir, "distill"), "training_log")["uri"])
    assert (log / "train_log.jsonl").read_text().count("\n") >= 2

    ev = _executor_output(local_run.dir, "evaluate")
    metrics = _artifact(ev, "metrics")["metadata"]
    for key in ("fid", "precision", "recall", "density", "coverage", "diversity", "nfe_per_image",
                "seconds_per_image", "teacher_fid"):
        assert isinstance(metrics[key], float), key
    full = json.loads((Path(_artifact(ev, "evaluation")["uri"]) / "metrics.json").read_text())
    assert metrics["fid"] == pytest.approx(full["models"]["student"]["fid"])
    html = Path(_artifact(ev, "report_html")["uri"]).read_text()
    assert "data:image/png;base64," in html and not re.search(r'src="(?!data:)', html)
    markdown = Path(_artifact(ev, "report")["uri"]).read_text()
    assert "](data:image/png;base64," in markdown


@pytest.mark.slow
def test_local_run_registers_the_student_when_the_gates_pass(local_run):
    assert _executor_output(local_run.dir, "check-gates")["parameterValues"]["Output"] is True
    registration = _artifact(_executor_output(local_run.dir, "register"), "registration")
    entry = json.loads(Path(registration["uri"]).read_text())
    assert entry["name"] == "ddil-student" and entry["version"] == 1
    assert Path(entry["path"]).is_relative_to(local_run.registry)
    assert (Path(entry["path"]) / "model_index.json").is_file()


@pytest.mark.slow
def test_distill_runs_accelerate_launch_when_the_pod_has_several_gpus(local_run, tmp_path, monkeypatch):
    """gpu_count > 1: the distill component runs `accelerate launch --multi_gpu -m ddil_core.cli distill ...`
    (here a stub `accelerate` records its arguments and runs the module in one process)."""
    from components import distill

    record = tmp_path / "accelerate-args.txt"
    stub = tmp_path / "bin" / "accelerate"
    stub.parent.mkdir()
    stub.write_text(f"""#!/bin/sh
printf '%s\\n' "$@" > "{record}"
while [ "$1" != "-m" ]; do shift; done
shift
exec "{sys.executable}" -m "$@"
""")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DDIL_NUM_PROCESSES", "2")
    latents = SimpleNamespace(path=str(local_run.dir / "cache-latents" / "latents"))
    rollouts = [SimpleNamespace(path=str(local_run.dir / f"for-loop-2-iteration-{i}" / "teacher-rollouts" /
                                         "rollouts")) for i in range(2)]
    student = SimpleNamespace(path=str(tmp_path / "student"), metadata={})
    training_log = SimpleNamespace(path=str(tmp_path / "training_log"), metadata={})
    distill.python_func(recipe="tiny", overrides=LOCAL_RUN_OVERRIDES, latents=latents, rollouts=rollouts,
                        student=student, training_log=training_log)
    args = record.read_text().splitlines()
    assert args[:9] == ["launch", "--num_machines", "1", "--num_processes", "2", "--multi_gpu", "-m",
                        "ddil_core.cli", "distill"]
    assert [a for a in args if a.startswith("--rollouts=")] == [f"--rollouts={r.path}" for r in rollouts]
    assert (tmp_path / "student" / "model_index.json").is_file()
    assert (tmp_path / "training_log" / "train_log.jsonl").is_file()
    assert student.metadata["processes"] == 2 and student.metadata["steps"] == 2
