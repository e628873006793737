"""deploy: serve the registered student with KServe, the pipeline's last step (behind the gates, when deploy=true).

The task needs no GPU. It builds the InferenceService of k8s/serving/inferenceservice.yaml for the version that
register just recorded (name from the registered model, `ddil serve --model URI` with the storage URI the
registry recorded, or else the student artifact's own object-store URI), applies it with the `kubernetes` client
(create, or replace the existing service: a new version rolls out as a new revision) and waits until KServe
reports it Ready, then returns its URL. It fails the task when the service does not become ready in time.

The task's pod needs the service account `ddil-pipeline` (k8s/base/rbac.yaml: create/get/update
inferenceservices.serving.kserve.io). The functions below are plain and self-contained (imports inside) because
they are pasted into the component's source (kfp additional_funcs); the tests call them directly.
"""

from kfp.dsl import Artifact, Input, Model

from components.common import DDIL_IMAGE, ddil_component


def isvc_name(model_name: str) -> str:
    """A valid InferenceService name (a DNS-1035 label, KServe's rule) from a registered model name."""
    import re

    name = re.sub(r"[^a-z0-9-]+", "-", str(model_name).lower()).strip("-")
    if not name or not name[0].isalpha():
        name = "ddil-" + name
    return name[:45].rstrip("-")  # KServe derives longer names (NAME-predictor-...) that must stay within 63


def served_model_uri(entry: dict, student_uri: str) -> str:
    """The URI the serving pod loads: what the registry recorded for the version when the pod can read it (an
    object store), else the student artifact's URI (the same files, in the pipeline root). A path that only the
    register pod could see is refused."""
    remote = ("s3://", "minio://")
    for uri in (entry.get("uri"), entry.get("model_uri"), student_uri):
        if isinstance(uri, str) and uri.startswith(remote):
            return "s3://" + uri[len("minio://"):] if uri.startswith("minio://") else uri
    raise ValueError(
        f"deploy: no object-store URI for {entry.get('name')} version {entry.get('version')} (registry: "
        f"{entry.get('uri') or entry.get('model_uri') or entry.get('path')}, artifact: {student_uri}); the serving "
        "pod reads s3:// (or minio://): use a pipeline root and registry on object storage")


def inferenceservice_manifest(name: str, namespace: str, image: str, model_uri: str, model_name: str,
                              model_version: str, gpu_type: str = "nvidia.com/gpu", gpu_count: int = 1,
                              max_batch_size: int = 8) -> dict:
    """The InferenceService of k8s/serving/inferenceservice.yaml for one registered version."""
    import re

    if int(gpu_count) < 0:
        raise ValueError(f"gpu_count = {gpu_count} must be at least 0")
    labels = {"app.kubernetes.io/name": "ddil", "app.kubernetes.io/component": "serving",
              "app.kubernetes.io/part-of": "ddil",
              "ddil.io/model-name": re.sub(r"[^A-Za-z0-9._-]", "-", str(model_name))[:63].strip("-._") or "ddil",
              "ddil.io/model-version": re.sub(r"[^A-Za-z0-9._-]", "-", str(model_version))[:63] or "unknown"}
    gpus = {gpu_type: int(gpu_count)} if int(gpu_count) else {}
    container = {
        "name": "kserve-container",  # the name KServe requires of a predictor container
        "image": image,
        "command": ["ddil", "serve"],
        "args": [f"--model={model_uri}", f"--name={name}", "--http-port=8080", f"--max-batch-size={max_batch_size}"],
        "env": [{"name": "DDIL_CACHE", "value": "/cache/ddil"}, {"name": "HF_HUB_OFFLINE", "value": "1"}],
        "envFrom": [{"secretRef": {"name": "ddil-s3-credentials", "optional": True}}],
        "ports": [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": f"/v2/models/{name}/ready", "port": 8080}, "periodSeconds": 5,
                           "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 10, "failureThreshold": 6},
        "resources": {"requests": {"cpu": "4", "memory": "16Gi", **gpus}, "limits": {"memory": "32Gi", **gpus}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "model-cache", "mountPath": "/cache/ddil"}],
    }
    predictor = {
        "minReplicas": 1,
        "maxReplicas": 1,
        "serviceAccountName": "ddil-worker",
        "terminationGracePeriodSeconds": 60,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "model-cache", "emptyDir": {"sizeLimit": "50Gi"}}],
    }
    if gpus:  # the GPU node pool, as every GPU stage (pipelines/ddil.py, k8s/overlays/gpu-cluster)
        predictor["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
        predictor["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
                     "annotations": {"serving.kserve.io/deploymentMode": "Standard", "ddil.io/model-uri": model_uri}},
        "spec": {"predictor": predictor},
    }


def apply_inferenceservice(custom_api, manifest: dict, log=print) -> dict:
    """Create the InferenceService, or replace the one of that name (keeping its resourceVersion, as `kubectl
    replace` does); returns the object the API server stored."""
    group, version, plural = "serving.kserve.io", "v1beta1", "inferenceservices"
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    try:
        stored = custom_api.create_namespaced_custom_object(group, version, namespace, plural, manifest)
        log(f"created InferenceService {namespace}/{name}")
        return stored
    except Exception as exc:  # kubernetes.client.ApiException
        if getattr(exc, "status", None) != 409:
            raise
    current = custom_api.get_namespaced_custom_object(group, version, namespace, plural, name)
    body = dict(manifest, metadata=dict(manifest["metadata"],
                                        resourceVersion=current["metadata"]["resourceVersion"]))
    stored = custom_api.replace_namespaced_custom_object(group, version, namespace, plural, name, body)
    log(f"replaced InferenceService {namespace}/{name} (a new revision)")
    return stored


def wait_until_ready(custom_api, name: str, namespace: str, generation: int, timeout_seconds: float = 1800,
                     poll_seconds: float = 10, log=print, sleep=None, clock=None) -> dict:
    """Poll until KServe reports condition Ready=True for this generation (status.observedGeneration); returns the
    object. TimeoutError, naming the conditions KServe reported, after timeout_seconds."""
    import time

    sleep = sleep or time.sleep
    clock = clock or time.monotonic
    deadline = clock() + timeout_seconds
    last = None
    while True:
        obj = custom_api.get_namespaced_custom_object("serving.kserve.io", "v1beta1", namespace,
                                                      "inferenceservices", name)
        status = obj.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        ready = conditions.get("Ready", {})
        seen = (ready.get("status"), ready.get("reason"), ready.get("message"))
        if seen != last:
            log(f"InferenceService {namespace}/{name}: Ready={seen[0]} {seen[1] or ''} {seen[2] or ''}".rstrip())
            last = seen
        if ready.get("status") == "True" and int(status.get("observedGeneration") or 0) >= int(generation):
            return obj
        if clock() > deadline:
            summary = "; ".join(f"{t}={c.get('status')} {c.get('message') or ''}".strip()
                                for t, c in conditions.items()) or "no status"
            raise TimeoutError(f"InferenceService {namespace}/{name} not ready after {timeout_seconds} s: {summary}")
        sleep(poll_seconds)


@ddil_component(isvc_name, served_model_uri, inferenceservice_manifest, apply_inferenceservice, wait_until_ready)
def deploy(student: Input[Model], registration: Input[Artifact], gpu_type: str, image: str = DDIL_IMAGE,
           namespace: str = "", gpu_count: int = 1, max_batch_size: int = 8, timeout_seconds: int = 1800,
           poll_seconds: int = 10) -> str:
    """Apply the InferenceService of the version `registration` records and wait until it is Ready; returns its
    URL (status.url)."""
    import json
    import os

    with open(registration.path, encoding="utf-8") as handle:
        entry = json.load(handle)
    if not namespace:
        path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        namespace = open(path).read().strip() if os.path.exists(path) else "default"
    model_uri = served_model_uri(entry, student.uri)
    name = isvc_name(entry["name"])
    manifest = inferenceservice_manifest(name, namespace, image, model_uri, entry["name"], str(entry["version"]),
                                         gpu_type, gpu_count, max_batch_size)
    print(json.dumps(manifest, indent=2))

    from kubernetes import client as kube_client
    from kubernetes import config as kube_config

    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config(os.environ.get("KUBECONFIG"))  # a run outside the cluster; None: ~/.kube/config
    api = kube_client.CustomObjectsApi()
    stored = apply_inferenceservice(api, manifest)
    ready = wait_until_ready(api, name, namespace, stored["metadata"].get("generation", 1), timeout_seconds,
                             poll_seconds)
    url = (ready.get("status") or {}).get("url") or ""
    print(f"serving {entry['name']} version {entry['version']} at {url}: POST {url}/v1/models/{name}:predict")
    return url
