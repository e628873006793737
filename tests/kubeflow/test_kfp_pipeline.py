"""The Kubeflow Pipelines face: components/, pipelines/ddil.py and the checked-in pipelines/ddil.yaml.

- the compiled YAML runs end to end with kfp's local runner (SubprocessRunner, use_venv=False) on the tiny recipe;
- the YAML's Kubernetes settings: GPU requests, GPU node pool, /dev/shm, volumes, secrets by name only, caching,
  retries, and that every channel a nested task uses is wired through its enclosing groups;
- the checked-in YAML equals a fresh compile (`make compile`);
- `kfp --endpoint URL run create|submit ...` and `kfp pipeline create|create-version` against a local stub of
  the KFP v2beta1 API (tests/fakes/kfp_api_stub.py; the real API server needs a cluster);
- the multi-node launcher: the TrainJob / PyTorchJob manifests (cross-checked with k8s/training/) and the
  create / wait / log / delete logic (the Kubeflow SDK's TrainerClient, the kubernetes watch API) against a stub of
  the Kubernetes API (tests/fakes/kube_training_stub.py) that validates jobs against the Trainer CRDs;
- the distill task's one run id, telemetry settings, retries, CPU/memory requests and limits and deadlines.
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

from tests import ROOT

PIPELINE_YAML = ROOT / "pipelines" / "ddil.yaml"
GPU_EXECUTORS = ("cache-latents", "teacher-rollouts", "distill", "evaluate", "diagnose")
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
        "gpu_count": "NUMBER_INTEGER", "gpu_task_cpu": "STRING", "gpu_task_memory": "STRING",
        "checkpoint_root": "STRING", "registry_uri": "STRING", "kubeflow_registry_address": "STRING",
        "fid_factor": "NUMBER_DOUBLE", "min_coverage": "NUMBER_DOUBLE", "min_adherence": "NUMBER_DOUBLE",
        "pushgateway": "STRING", "multi_node": "BOOLEAN", "num_nodes": "NUMBER_INTEGER",
        "training_operator": "STRING", "deploy": "BOOLEAN",
    }
    assert {k: v["parameterType"] for k, v in params.items()} == expected
    assert all("defaultValue" in v for v in params.values()), "every parameter has a default (no optional inputs)"
    assert params["recipe"]["defaultValue"] == "tiny" and params["multi_node"]["defaultValue"] is False
    assert params["deploy"]["defaultValue"] is False  # serving is opt-in (tests/kubeflow/test_deploy.py)
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

    for stage, cached, retries in (("cache-latents", True, 2), ("teacher-rollouts", True, 2),
                                   ("distill", False, 3), ("launch-trainjob", False, 0),
                                   ("evaluate", True, 2), ("diagnose", True, 2), ("register", False, 2),
                                   ("resolve-config", False, 0), ("check-gates", False, 0)):
        tasks = _tasks_of(spec, stage)
        assert tasks, stage
        for name, task in tasks:
            assert caching(task) is cached, f"{name}: caching should be {cached}"
            if retries:
                assert task["retryPolicy"]["maxRetryCount"] == retries, name
                assert task["retryPolicy"]["backoffDuration"] == "60s", name
            else:
                assert "retryPolicy" not in task, name


def test_gpu_tasks_have_cpu_memory_requests_limits_and_a_deadline():
    """Every GPU task asks for CPU and memory (requests = limits, from the gpu_task_cpu / gpu_task_memory
    parameters: no BestEffort pod evicted first under node pressure) and has a pod deadline; distill retries and
    checkpoints on the ddil-data volume (checkpoint_root's default)."""
    spec, platform = _docs()
    k8s = platform["deploymentSpec"]["executors"]
    cpu = "{{$.inputs.parameters['pipelinechannel--gpu_task_cpu']}}"
    memory = "{{$.inputs.parameters['pipelinechannel--gpu_task_memory']}}"
    for stage in GPU_EXECUTORS:
        for name, executor in _executors(spec, stage).items():
            res = executor["container"]["resources"]
            assert (res["resourceCpuRequest"], res["resourceCpuLimit"]) == (cpu, cpu), name
            assert (res["resourceMemoryRequest"], res["resourceMemoryLimit"]) == (memory, memory), name
            assert int(k8s[name]["activeDeadlineSeconds"]) >= 3600, name
    assert int(k8s["exec-distill"]["activeDeadlineSeconds"]) == 7 * 24 * 3600
    assert int(k8s["exec-launch-trainjob"]["activeDeadlineSeconds"]) > 7 * 24 * 3600  # outlives the job's timeout
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_task_cpu"]["defaultValue"] == "8" and params["gpu_task_memory"]["defaultValue"] == "64Gi"
    assert params["checkpoint_root"]["defaultValue"] == "/data/ddil-runs"
    mounts = {(m["pvcNameParameter"]["runtimeValue"]["constant"], m["mountPath"])
              for m in k8s["exec-distill"]["pvcMount"]}
    assert ("ddil-data", "/data") in mounts
    for name, task in _tasks_of(spec, "distill"):
        assert task["inputs"]["parameters"]["checkpoint_root"]["componentInputParameter"].endswith("checkpoint_root")


def test_every_stage_gets_the_run_id_and_the_telemetry_settings():
    """One run id for every stage (KFP's run id placeholder), and $DDIL_PUSHGATEWAY / $DDIL_METRICS_PORT from the
    ddil-settings ConfigMap (k8s/base) in every stage that pushes or serves metrics; the distill pod carries the
    labels the PodMonitor selects."""
    spec, platform = _docs()
    k8s = platform["deploymentSpec"]["executors"]
    for stage in ("cache-latents", "teacher-rollouts", "distill", "launch-trainjob", "evaluate", "diagnose",
                  "register"):
        tasks = _tasks_of(spec, stage)
        assert tasks, stage
        for name, task in tasks:
            assert task["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
        for name in _executors(spec, stage):
            (cm,) = k8s[name]["configMapAsEnv"]
            assert cm["configMapName"] == "ddil-settings" and cm["optional"] is True, name
            assert {(k["configMapKey"], k["envVar"]) for k in cm["keyToEnv"]} == {
                ("DDIL_PUSHGATEWAY", "DDIL_PUSHGATEWAY"), ("DDIL_METRICS_PORT", "DDIL_METRICS_PORT")}, name
    base = yaml.safe_load((ROOT / "k8s" / "base" / "kustomization.yaml").read_text())
    literals = [item.split("=")[0] for cm in base["configMapGenerator"] if cm["name"] == "ddil-settings"
                for item in cm["literals"]]
    assert {"DDIL_PUSHGATEWAY", "DDIL_METRICS_PORT"} <= set(literals)
    podmonitor = yaml.safe_load((ROOT / "k8s" / "components" / "prometheus-operator" / "podmonitor.yaml").read_text())
    labels = k8s["exec-distill"]["podMetadata"]["labels"]
    assert podmonitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


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
    evaluates = _tasks_of(spec, "evaluate")
    assert len(evaluates) == 2, "one evaluate per distill branch"
    for name, task in evaluates:  # the curve measured once: evaluate takes diagnose's folder
        source = task["inputs"]["artifacts"]["diagnosis"]["taskOutputArtifact"]
        assert source["producerTask"].startswith("diagnose") and source["outputArtifactKey"] == "diagnosis", name


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
    merged = resolve_config.python_func(resolved_config=out, **dict(kwargs, recipe="sdxl-tdd", objective="tdd"))
    assert "objective.name='tdd'" in merged and yaml.safe_load(Path(out.path).read_text())["objective"]["tdd"]["eta"] == 0.2
    with pytest.raises(ConfigError, match="objective.name"):
        resolve_config.python_func(resolved_config=out, **dict(kwargs, objective="tdd2"))
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


def test_watch_scalars_show_a_watched_runs_last_and_best_measures(tmp_path):
    """What the distill component logs as its `watch` Metrics artifact, from the train log's measure lines."""
    from components.common import watch_scalars

    log = tmp_path / "train_log.jsonl"
    lines = [{"step": 1, "loss": {"pd": {"all": 0.5}}}, {"step": 0, "eval": {"kid": 0.4, "adherence": 0.6}},
             {"step": 2, "eval": {"kid": 0.1, "adherence": 0.9, "note": "x"}},
             {"step": 4, "eval": {"kid": 0.3, "adherence": 0.7, "drift": float("nan")}}]
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert watch_scalars(str(log)) == {"watch_step": 4.0, "watch_kid": 0.3, "watch_adherence": 0.7,
                                       "watch_best_kid": 0.1, "watch_best_adherence": 0.9}
    assert watch_scalars(str(tmp_path / "absent.jsonl")) == {}


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
    from tests.fakes.kfp_api_stub import KfpApiStub

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


# The launcher's job handling against a stub of the Kubernetes API (tests/fakes/kube_training_stub.py): the Kubeflow
# SDK's TrainerClient and the kubernetes client speak HTTP to it, jobs are validated against the Trainer CRDs on create.

def _trainer(stub):
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    return TrainerClient(KubernetesBackendConfig(namespace="ddil", client_configuration=stub.configuration()))


def _core(stub):
    from kubernetes import client

    api = client.ApiClient(stub.configuration())
    return client.CustomObjectsApi(api), client.CoreV1Api(api)


def _trainjob(**kw):
    from components.trainjob import trainjob_manifest

    return trainjob_manifest("ddil-distill-abc", "ddil", "img:1", 2, 8, "nvidia.com/gpu", _job_args(), **kw)


def _pytorchjob():
    from components.trainjob import pytorchjob_manifest

    return pytorchjob_manifest("ddil-distill-abc", "ddil", "img:1", 2, 1, "nvidia.com/gpu", _job_args())


def _used_beyond_the_role(requests: list) -> list:
    """The API requests (in the ddil namespace) that the ddil-pipeline Role of k8s/base/rbac.yaml does not allow."""
    role = next(d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "rbac.yaml").read_text()) if d["kind"] == "Role")
    allowed = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    missing = []
    for method, path in requests:
        m = re.fullmatch(r"/(?:api/v1|apis/([^/]+)/[^/]+)/namespaces/([^/]+)/([^/]+)(/[^/]+)?(/log)?", path)
        if not m or m.group(2) != "ddil":
            continue  # the SDK's version check reads kubeflow-system and only warns when refused
        group, resource = m.group(1) or "", m.group(3) + ("/log" if m.group(5) else "")
        verb = {"POST": "create", "DELETE": "delete"}.get(method, "get" if m.group(4) else "list")
        if (group, resource, verb) not in allowed:
            missing.append((group, resource, verb))
    return missing


def test_trainjob_runs_through_the_trainer_client_streams_rank0_and_is_deleted():
    from components.trainjob import run_trainjob
    from tests.fakes.kube_training_stub import KubeApiStub, condition

    script = [[], [condition("Complete", "JobsCompleted", "all nodes finished")]]
    with KubeApiStub(script, logs=["step 1", "step 2"], step_s=2.5) as stub:
        lines = []
        run_trainjob(_trainer(stub), _trainjob(), poll_seconds=1, timeout_seconds=60, log=lines.append)
        calls = stub.requests
    assert ("POST", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ddil/trainjobs") in calls
    assert ("GET", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ddil/trainingruntimes/ddil-torch-distributed") \
        in calls  # the SDK reads the job's runtime
    assert any(path.endswith("/log") and "-node-0-0-" in path for _, path in calls)
    assert stub.deletions == [("ddil-distill-abc", None)] and not stub.objects.keys() - {
        k for k in stub.objects if k[0] == "trainingruntimes"}
    streamed = [line.split("] ", 1)[1] for line in lines if line.startswith("[ddil-distill-abc-node-0-0-")]
    assert streamed == ["step 1", "step 2"], lines  # rank 0's log, once
    assert any("succeeded" in line for line in lines)
    assert _used_beyond_the_role(calls) == [], "the launcher's service account (ddil-pipeline) may do all this"


def test_trainjob_failure_names_the_reason_and_the_job_is_deleted():
    from components.trainjob import run_trainjob
    from tests.fakes.kube_training_stub import KubeApiStub, condition

    with KubeApiStub([[], [condition("Failed", "JobFailed", "node-0 exited with 2")]], step_s=0.5) as stub:
        with pytest.raises(RuntimeError, match="failed: JobFailed: node-0 exited with 2"):
            run_trainjob(_trainer(stub), _trainjob(), poll_seconds=1, timeout_seconds=60, log=lambda _: None)
    assert [name for name, _ in stub.deletions] == ["ddil-distill-abc"]


def test_trainjob_timeout_and_interruption_delete_the_job():
    from components.trainjob import run_trainjob
    from tests.fakes.kube_training_stub import KubeApiStub

    with KubeApiStub([[]]) as stub:
        with pytest.raises(TimeoutError):
            run_trainjob(_trainer(stub), _trainjob(), poll_seconds=1, timeout_seconds=3, log=lambda _: None)
        assert len(stub.deletions) == 1

        def interrupted(line):
            if line.startswith("created"):
                raise KeyboardInterrupt  # as a stopped task's SIGTERM (sys.exit) does

        with pytest.raises(KeyboardInterrupt):
            run_trainjob(_trainer(stub), _trainjob(), poll_seconds=1, timeout_seconds=60, log=interrupted)
        assert len(stub.deletions) == 2


def test_an_invalid_trainjob_is_refused_by_the_api_and_nothing_is_left():
    """The stub's strict CRD validation stands in for the API server's: a field Trainer v2.3 does not know fails."""
    from kubernetes.client.exceptions import ApiException

    from components.trainjob import run_trainjob
    from tests.fakes.kube_training_stub import KubeApiStub

    bad = _trainjob()
    bad["spec"]["trainer"]["numProcPerNode"] = "auto"
    with KubeApiStub([[]]) as stub:
        with pytest.raises(ApiException) as info:
            run_trainjob(_trainer(stub), bad, poll_seconds=1, timeout_seconds=60, log=lambda _: None)
    assert info.value.status == 422 and "numProcPerNode" in stub.rejected[0]["message"]
    assert stub.deletions == []


def test_pytorchjob_is_watched_to_success_with_the_master_log():
    from components.trainjob import run_pytorchjob
    from tests.fakes.kube_training_stub import KubeApiStub, condition

    script = [[condition("Created")], [condition("Created"), condition("Running")],
              [condition("Created"), condition("Succeeded", "PyTorchJobSucceeded", "done")]]
    with KubeApiStub(script, logs=["epoch 1"], step_s=0.7) as stub:
        lines = []
        custom, core = _core(stub)
        job = run_pytorchjob(custom, core, _pytorchjob(), poll_seconds=0.2, timeout_seconds=60, log=lines.append)
        calls = stub.requests
    assert job["status"]["conditions"][-1]["type"] == "Succeeded"
    assert ("GET", "/apis/kubeflow.org/v1/namespaces/ddil/pytorchjobs") in calls  # the watch
    assert any(line.startswith("[ddil-distill-abc-master-0@") and line.endswith("] epoch 1") for line in lines), lines
    assert stub.deletions == [("ddil-distill-abc", "Background")]
    assert _used_beyond_the_role(calls) == []


def test_pytorchjob_failure_and_a_job_left_by_an_earlier_attempt():
    import time as _time

    from components.trainjob import run_pytorchjob
    from tests.fakes.kube_training_stub import KubeApiStub, condition

    with KubeApiStub([[condition("Created")], [condition("Failed", "PyTorchJobFailed", "master exited 2")]],
                     step_s=0.5) as stub:
        left = _pytorchjob()
        left["metadata"].update(uid="old", creationTimestamp="2026-12-01T09:00:00Z")
        key = ("pytorchjobs", "ddil", "ddil-distill-abc")
        stub.objects[key], stub.created_at[key] = left, _time.monotonic()
        lines = []
        custom, core = _core(stub)
        with pytest.raises(RuntimeError, match="failed: PyTorchJobFailed: master exited 2"):
            run_pytorchjob(custom, core, _pytorchjob(), poll_seconds=0.2, timeout_seconds=60, log=lines.append)
    assert any("replacing" in line for line in lines)
    # the earlier attempt's job deleted in the foreground (its pods gone before the new one), the new one at the end
    assert stub.deletions == [("ddil-distill-abc", "Foreground"), ("ddil-distill-abc", "Background")]


@pytest.mark.parametrize("operator, kind", [("v2", "TrainJob"), ("v1", "PyTorchJob")])
def test_launch_trainjob_component_stages_runs_and_returns_the_student(tmp_path, monkeypatch, operator, kind):
    """The component body against the API stub, whose job 'trains' by writing a student into its --out folder."""
    import signal

    import kubernetes

    from components import launch_trainjob
    from tests.fakes.kube_training_stub import KubeApiStub, condition

    def train(body):
        spec = body["spec"]
        if kind == "TrainJob":
            args = spec["trainer"]["args"]
        else:
            args = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
        opts = dict(a[2:].split("=", 1) for a in args[1:] if a.startswith("--") and "=" in a)
        assert Path(opts["latents"], "manifest.json").is_file()
        assert sorted(p.name for p in Path(opts["rollouts"]).iterdir()) == ["shard-0000", "shard-0001"]
        assert yaml.safe_load(Path(opts["config"]).read_text())["training"]["steps"] == 3
        assert "--set=telemetry.run_id='run-1'" in args  # the run's id: the Pushgateway group of every node
        student_dir = Path(opts["out"], "student")
        student_dir.mkdir(parents=True)
        (student_dir / "model_index.json").write_text("{}")
        (student_dir / "ddil_student.json").write_text(json.dumps({"num_inference_steps": 2}))
        Path(opts["out"], "train_log.jsonl").write_text('{"step": 1}\n')

    done = condition("Complete") if kind == "TrainJob" else condition("Succeeded")
    with KubeApiStub([[], [done]], step_s=0.5) as stub:
        stub.on_create = train
        monkeypatch.setattr(kubernetes.config, "load_incluster_config",
                            lambda: kubernetes.client.Configuration.set_default(stub.configuration()))

        def folder(name, files):
            path = tmp_path / "inputs" / name
            path.mkdir(parents=True)
            for f in files:
                (path / f).write_text("x")
            return SimpleNamespace(path=str(path))

        student = SimpleNamespace(path=str(tmp_path / "out" / "student"), metadata={})
        training_log = SimpleNamespace(path=str(tmp_path / "out" / "training_log"), metadata={})
        shared = tmp_path / "data" / "ddil-runs"
        monkeypatch.setattr(signal, "signal", lambda *a: None)  # the component's SIGTERM handler, not in pytest
        for key in ("DDIL_RUN_ID", "DDIL_KFP_RUN_ID"):
            monkeypatch.setenv(key, "")  # the component sets them in this process
        launch_trainjob.python_func(
            recipe="tiny", overrides=["training.steps=3"], latents=folder("latents", ["manifest.json"]),
            rollouts=[folder("r0", ["manifest.json"]), folder("r1", ["manifest.json"])], num_nodes=2,
            gpu_type="nvidia.com/gpu", gpu_count=8, training_operator=operator, run_id="run-1", student=student,
            training_log=training_log, image="img:1", namespace="ddil", shared_root=str(shared), poll_seconds=1)
        kinds = {key[0] for key in stub.objects}
    assert (Path(student.path) / "model_index.json").is_file()
    assert (Path(training_log.path) / "train_log.jsonl").is_file()
    assert student.metadata["steps"] == 2 and student.metadata["training_job"].startswith(f"{kind}/ddil-distill-")
    assert len(stub.deletions) == 1 and kinds == {"trainingruntimes"}, "the job is deleted at the end"
    assert list(shared.iterdir()) == [], "the staged job folder is removed after success"


COMPLETE = [{"type": "Created", "status": "True"}, {"type": "Complete", "status": "True", "reason": "JobsCompleted",
                                                    "message": "all nodes finished"}]
FAILED = [{"type": "Created", "status": "True"}, {"type": "Failed", "status": "True", "reason": "JobFailed",
                                                  "message": "node-0 exited with 2"}]


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
    """The checked-in YAML run by kfp's local runner; its stages push to a real Pushgateway named, as in the
    cluster, by $DDIL_PUSHGATEWAY (the ddil-settings ConfigMap) rather than by a pipeline parameter."""
    from kfp import components as kfp_components
    from kfp import local

    from tests.fakes.pushgateway import start_pushgateway

    root = tmp_path_factory.mktemp("kfp-local")
    warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*", category=RuntimeWarning)
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*", category=UserWarning)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "pipeline-root"),
               raise_on_error=True)
    pipeline = kfp_components.load_component_from_file(str(PIPELINE_YAML))  # the checked-in YAML itself
    saved = {k: os.environ.get(k) for k in ("DDIL_PUSHGATEWAY", "DDIL_RUN_ID", "DDIL_KFP_RUN_ID")}
    with start_pushgateway() as gateway:
        os.environ["DDIL_PUSHGATEWAY"] = gateway  # the task subprocesses inherit it
        for key in ("DDIL_RUN_ID", "DDIL_KFP_RUN_ID"):
            os.environ.pop(key, None)
        try:
            start = time.monotonic()
            pipeline(teacher="tiny://sd15", dataset="demo://digits", recipe="tiny", overrides=LOCAL_RUN_OVERRIDES,
                     num_shards=2, registry_uri=str(root / "registry"), fid_factor=1000.0, min_coverage=0.0,
                     checkpoint_root=str(root / "durable"))
            elapsed = time.monotonic() - start
            from tests.fakes.pushgateway import read_metrics

            pushed = read_metrics(gateway)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    [run_dir] = (root / "pipeline-root").iterdir()
    yield SimpleNamespace(dir=run_dir, registry=root / "registry", elapsed=elapsed, pushed=pushed,
                          durable=root / "durable")
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
        "diagnose/executor_output.json", "distill/executor_output.json", "evaluate/executor_output.json",
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
def test_local_run_diagnoses_the_student(local_run):
    """`ddil diagnose` as a KFP component: the covariate-shift curve of the pipeline's student, its headline metrics
    logged, and its plots in one self-contained page."""
    diag = _executor_output(local_run.dir, "diagnose")
    metrics = _artifact(diag, "metrics")["metadata"]
    assert isinstance(metrics["covariate_drift_final"], float) and isinstance(metrics["covariate_compounding"], float)
    result = json.loads((Path(_artifact(diag, "diagnosis")["uri"]) / "diagnose.json").read_text())
    assert result["drift"][0]["value"] == 0.0 and result["num_steps"] == 2
    page = Path(_artifact(diag, "curve")["uri"]).read_text()
    assert page.count("data:image/png;base64,") == 2
    # evaluate ran after diagnose and took its curve instead of measuring it again
    evaluation = _artifact(_executor_output(local_run.dir, "evaluate"), "evaluation")
    taken = json.loads((Path(evaluation["uri"]) / "metrics.json").read_text())["covariate_shift"]
    assert taken["headline"] == result["headline"] and taken["drift"] == result["drift"]


@pytest.mark.slow
def test_local_run_registers_the_student_when_the_gates_pass(local_run):
    assert _executor_output(local_run.dir, "check-gates")["parameterValues"]["Output"] is True
    registration = _artifact(_executor_output(local_run.dir, "register"), "registration")
    entry = json.loads(Path(registration["uri"]).read_text())
    assert entry["name"] == "ddil-student" and entry["version"] == 1
    assert Path(entry["path"]).is_relative_to(local_run.registry)
    assert (Path(entry["path"]) / "model_index.json").is_file()


def _pushed_groups(text: str) -> dict:
    """{stage: {run ids}} of the ddil_stage_success series a Pushgateway holds."""
    from prometheus_client.parser import text_string_to_metric_families

    groups: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ddil_stage_success" and sample.labels.get("job") == "ddil":
                groups.setdefault(sample.labels["stage"], {})[sample.labels["run_id"]] = sample.value
    return groups


@pytest.mark.slow
def test_local_run_every_stage_pushes_under_the_one_run_id(local_run):
    """Every stage of the run pushed to the Pushgateway ($DDIL_PUSHGATEWAY) under the run's id (KFP's run id
    placeholder), the id the lineage of the registered student names too."""
    groups = _pushed_groups(local_run.pushed)
    assert set(groups) == {"cache-latents", "teacher-rollouts", "distill", "evaluate", "diagnose", "register"}, groups
    run_ids = {run_id for by_run in groups.values() for run_id in by_run}
    assert len(run_ids) == 1, groups
    (run_id,) = run_ids
    assert all(by_run[run_id] == 1.0 for by_run in groups.values()), groups  # every stage succeeded
    assert run_id not in ("", "ddil", "distill") and "{{" not in run_id
    entry = json.loads(Path(_artifact(_executor_output(local_run.dir, "register"), "registration")["uri"]).read_text())
    assert entry["lineage"]["kfp_run_id"] == entry["lineage"]["run_id"] == run_id


@pytest.mark.slow
def test_local_run_records_the_lineage_in_the_registry_and_the_artifacts(local_run):
    """The registered version names the code (git SHA), the data (dataset hash), the caches (latent-cache and
    rollouts hashes) and the KFP run that made it; the student Model artifact and the registration carry the same."""
    from ddil_core.registry.model_card import git_commit

    registration = _artifact(_executor_output(local_run.dir, "register"), "registration")
    entry = json.loads(Path(registration["uri"]).read_text())
    lineage = entry["lineage"]
    latents = _artifact(_executor_output(local_run.dir, "cache-latents"), "latents")
    cache_manifest = Path(latents["uri"]) / "manifest.json"
    import hashlib

    assert lineage["git_sha"] == git_commit()
    assert lineage["dataset"] == "demo://digits" and lineage["dataset_sha256"] == latents["metadata"]["dataset_sha256"]
    assert lineage["latent_cache_sha256"] == hashlib.sha256(cache_manifest.read_bytes()).hexdigest()
    assert len(lineage["rollouts_sha256"]) == 64
    student = _artifact(_executor_output(local_run.dir, "distill"), "student")["metadata"]
    for key in ("git_sha", "dataset_sha256", "latent_cache_sha256", "rollouts_sha256", "kfp_run_id"):
        assert student[key] == lineage[key] == registration["metadata"][key], key
    card = (Path(entry["path"]) / "README.md").read_text()
    assert "## Lineage" in card and lineage["kfp_run_id"] in card
    assert not any(local_run.durable.iterdir()), "distill removes its checkpoints once the student is out"


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
    for key in ("DDIL_RUN_ID", "DDIL_KFP_RUN_ID"):  # the component sets them in this process: undone after the test
        monkeypatch.setenv(key, "")
    distill.python_func(recipe="tiny", overrides=LOCAL_RUN_OVERRIDES, run_id="accelerate-run", latents=latents,
                        rollouts=rollouts, student=student, training_log=training_log,
                        watch=SimpleNamespace(log_metric=lambda *_: None), checkpoint_root=str(tmp_path / "durable"))
    args = record.read_text().splitlines()
    assert args[:9] == ["launch", "--num_machines", "1", "--num_processes", "2", "--multi_gpu", "-m",
                        "ddil_core.cli", "distill"]
    assert [a for a in args if a.startswith("--rollouts=")] == [f"--rollouts={r.path}" for r in rollouts]
    assert (tmp_path / "student" / "model_index.json").is_file()
    assert (tmp_path / "training_log" / "train_log.jsonl").is_file()
    assert student.metadata["processes"] == 2 and student.metadata["steps"] == 2
