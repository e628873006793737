"""A stub of the Kubernetes API server for the multi-node launcher (components/trainjob.py): the real Kubeflow SDK
(TrainerClient) and the real kubernetes client talk HTTP to it. A stub, because an API server with the Trainer and
Training Operator controllers cannot run here.

What it serves, as the API server does (paths, status codes, Status bodies, watch streams, log streams):

- trainer.kubeflow.org/v1alpha1 trainjobs and trainingruntimes, kubeflow.org/v1 pytorchjobs: create (POST; strict
  validation against the released CRD schemas, tests/fakes/crd_validate.py: 422 naming the field; 409 when the name
  exists), get, list (also `?watch=true`: newline-delimited ADDED / MODIFIED / DELETED events), delete;
- kubeflow.org/v1beta1 experiments (Katib): create (strict validation against the v1beta1 API of Katib v0.19.0,
  tests/fakes/crd_validate.py), get, list, delete; no controller runs them;
- core/v1 pods (get, list by label selector) and pod logs (`follow=true` streams until the pod ends);
- the Trainer's version ConfigMap is absent (404: the SDK only warns).

In place of the controllers, a created job runs the scripted `script`: a list of condition lists, the job's status
advancing one entry every `step_s` seconds after creation. Its rank-0 pod (the Trainer's `<job>-node-0-0-<id>` or
the operator's `<job>-master-0`) runs while the job runs, ends Succeeded or Failed with it, and logs `logs`.
`on_create(obj)` (if set) runs when a job is created: the tests' "training" (it writes the student).
"""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from typing import Callable, Optional
from urllib.parse import parse_qs, urlsplit

import yaml

from tests import ROOT
from tests.fakes import crd_validate
from tests.fakes.http_stub import HttpStub, StubRequest

RUNTIME = ROOT / "k8s" / "training" / "trainingruntime.yaml"
# the CRD release whose schema a create is validated against
VALIDATED = {"trainjobs": "v2.3.0", "pytorchjobs": "v1.9.4"}
KINDS = {"trainjobs": "TrainJob", "pytorchjobs": "PyTorchJob", "trainingruntimes": "TrainingRuntime",
         "experiments": "Experiment"}
STORED = {"experiments": "v0.19.0"}  # validated on create, stored as created (no simulated controller)


def condition(type_: str, reason: str = "", message: str = "") -> dict:
    return {"type": type_, "status": "True", "reason": reason or type_, "message": message or type_,
            "lastTransitionTime": "2026-12-01T10:00:00Z"}


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class KubeRequest(StubRequest):
    """A request that can be answered with a Status body or a chunked stream (watch events, a followed log)."""

    def status(self, code: int, reason: str, message: str) -> None:
        self.send_json(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                              "reason": reason, "message": message})

    def start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        self.close_connection = True


class KubeApiStub(HttpStub):
    methods = ("GET", "POST", "DELETE")
    request_class = KubeRequest  # HTTP/1.1: streams (watch, log follow) are chunked, as the API server's are

    def __init__(self, script: list, logs: Optional[list] = None, step_s: float = 0.3):
        self.script = script
        self.logs = list(logs or [])
        self.step_s = step_s
        self.on_create: Optional[Callable[[dict], None]] = None
        self.objects: dict[tuple, dict] = {}  # (plural, namespace, name) -> object
        self.created_at: dict[tuple, float] = {}
        self.requests: list[tuple[str, str]] = []
        self.deletions: list[tuple[str, Optional[str]]] = []  # (name, propagationPolicy)
        self.rejected: list[dict] = []  # 422 Status bodies
        self.lock = threading.Lock()
        runtime = yaml.safe_load(RUNTIME.read_text())
        self.objects[("trainingruntimes", runtime["metadata"]["namespace"], runtime["metadata"]["name"])] = runtime

    # ------------------------------------------------------------------ the simulated controllers
    def _conditions(self, key: tuple) -> list:
        index = int((time.monotonic() - self.created_at[key]) / self.step_s)
        return self.script[min(index, len(self.script) - 1)]

    def finished(self, key: tuple) -> Optional[bool]:
        """None while running, True when the job succeeded, False when it failed (or it is gone)."""
        if key not in self.objects:
            return False
        types = {c["type"] for c in self._conditions(key) if c.get("status") == "True"}
        if "Failed" in types:
            return False
        return True if types & {"Complete", "Succeeded"} else None

    def _job(self, key: tuple) -> dict:
        obj = json.loads(json.dumps(self.objects[key]))
        if key[0] in VALIDATED:
            obj["status"] = {"conditions": self._conditions(key)}
        return obj

    def _rank0_pods(self, namespace: str) -> list[dict]:
        pods = []
        for key, job in self.objects.items():
            if key[1] != namespace or key[0] not in VALIDATED:
                continue
            name = key[2]
            state = self.finished(key)
            phase = "Running" if state is None else ("Succeeded" if state else "Failed")
            if key[0] == "trainjobs":
                pod_name, container = f"{name}-node-0-0-{job['metadata']['uid'][:5]}", "node"
                labels = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                          "batch.kubernetes.io/job-completion-index": "0"}
                resources = job["spec"]["trainer"].get("resourcesPerNode") or {}
            else:
                pod_name, container = f"{name}-master-0", "pytorch"
                labels = {"training.kubeflow.org/job-name": name, "training.kubeflow.org/replica-type": "master"}
                master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
                resources = master.get("resources") or {}
            pods.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": namespace, "labels": labels,
                             "uid": job["metadata"]["uid"], "creationTimestamp": job["metadata"]["creationTimestamp"]},
                "spec": {"containers": [{"name": container, "image": "img", "resources": resources}]},
                "status": {"phase": phase},
                "_job": key,
            })
        return pods

    # ------------------------------------------------------------------ HTTP
    def handle(self, request: KubeRequest) -> None:
        parts = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.requests.append((request.command, parts.path))
        body = json.loads(request.body() or b"{}") if request.command == "POST" else None
        try:
            self._route(request, request.command, parts.path, query, body)
        except BrokenPipeError:
            pass

    def configuration(self):
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return cfg

    # ------------------------------------------------------------------ routes
    def _route(self, h, method: str, path: str, query: dict, body) -> None:
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/configmaps/([^/]+)", path)
        if m:
            return h.status(404, "NotFound", f'configmaps "{m.group(2)}" not found')
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?(/log)?", path)
        if m:
            return self._pods(h, m.group(1), m.group(2), bool(m.group(3)), query)
        m = re.fullmatch(r"/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?", path)
        if not m:
            return h.status(404, "NotFound", f"no route for {path}")
        _group, _version, namespace, plural, name = m.groups()
        if plural not in KINDS:
            return h.status(404, "NotFound", f"the server could not find the requested resource ({plural})")
        if method == "POST":
            return self._create(h, plural, namespace, body)
        if method == "DELETE":
            return self._delete(h, plural, namespace, name, query)
        if name:
            key = (plural, namespace, name)
            with self.lock:
                if key not in self.objects:
                    return h.status(404, "NotFound", f'{plural}.{_group} "{name}" not found')
                return h.send_json(200, self._job(key) if plural in VALIDATED else self.objects[key])
        if query.get("watch") in ("true", "True", "1"):
            return self._watch(h, plural, namespace, query)
        with self.lock:
            items = [self._job(k) for k in self.objects if k[0] == plural and k[1] == namespace]
        return h.send_json(200, {"kind": f"{KINDS[plural]}List", "items": items, "metadata": {"resourceVersion": "1"}})

    def _create(self, h, plural: str, namespace: str, obj: dict) -> None:
        release = VALIDATED.get(plural) or STORED.get(plural)
        problems = crd_validate.errors(obj, release) if release else []
        if problems:
            status = {"reason": "Invalid", "message": "; ".join(problems)}
            self.rejected.append(status)
            what = f"{KINDS[plural]}.{obj.get('apiVersion')}"
            return h.status(422, "Invalid", f"{what} is invalid: " + status["message"])
        key = (plural, namespace, obj["metadata"]["name"])
        with self.lock:
            if key in self.objects:
                return h.status(409, "AlreadyExists", f'{plural} "{key[2]}" already exists')
            obj = json.loads(json.dumps(obj))
            obj["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()), resourceVersion="1",
                                   creationTimestamp=_stamp())
            self.objects[key] = obj
            self.created_at[key] = time.monotonic()
        if self.on_create is not None:
            self.on_create(obj)
        return h.send_json(201, obj)

    def _delete(self, h, plural: str, namespace: str, name: str, query: dict) -> None:
        key = (plural, namespace, name)
        with self.lock:
            if key not in self.objects:
                return h.status(404, "NotFound", f'{plural} "{name}" not found')
            del self.objects[key]
            self.deletions.append((name, query.get("propagationPolicy")))
        return h.send_json(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

    def _watch(self, h, plural: str, namespace: str, query: dict) -> None:
        selector = query.get("fieldSelector", "")
        name = selector.split("=", 1)[1] if selector.startswith("metadata.name=") else None
        deadline = time.monotonic() + float(query.get("timeoutSeconds", 30))
        h.start_stream("application/json")
        last, kind = None, "ADDED"
        while time.monotonic() < deadline:
            with self.lock:
                keys = [k for k in self.objects if k[0] == plural and k[1] == namespace and name in (None, k[2])]
                events = [(kind if last is None else "MODIFIED", self._job(k)) for k in keys]
                gone = name is not None and not keys and last is not None
            if gone:
                h.chunk(json.dumps({"type": "DELETED", "object": last}).encode() + b"\n")
                break
            for event_type, obj in events:
                if last is None or obj.get("status") != last.get("status"):
                    obj["metadata"]["resourceVersion"] = str(int(time.monotonic() * 1000))
                    h.chunk(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")
                    last = obj
            time.sleep(0.05)
        h.end_stream()

    def _pods(self, h, namespace: str, pod_name: Optional[str], log: bool, query: dict) -> None:
        with self.lock:
            pods = self._rank0_pods(namespace)
        if pod_name is None:
            wanted = _parse_selector(query.get("labelSelector", ""))
            items = [{k: v for k, v in p.items() if k != "_job"} for p in pods
                     if all(test(p["metadata"]["labels"]) for test in wanted)]
            return h.send_json(200, {"kind": "PodList", "apiVersion": "v1", "items": items,
                                     "metadata": {"resourceVersion": "1"}})
        pod = next((p for p in pods if p["metadata"]["name"] == pod_name), None)
        if pod is None:
            return h.status(404, "NotFound", f'pods "{pod_name}" not found')
        if not log:
            return h.send_json(200, {k: v for k, v in pod.items() if k != "_job"})
        h.start_stream("text/plain")
        for line in self.logs:
            h.chunk(line.encode() + b"\n")
        while query.get("follow") in ("true", "True") and self.finished(pod["_job"]) is None:
            time.sleep(0.05)  # a followed log ends with the pod
        h.end_stream()


def _parse_selector(text: str) -> list:
    """Tests of a label selector: `k=v`, `k in (a, b)`, joined by commas outside parentheses."""
    tests, depth, current = [], 0, ""
    for ch in text + ",":
        if ch == "," and depth == 0:
            term = current.strip()
            current = ""
            if not term:
                continue
            m = re.fullmatch(r"(\S+)\s+in\s+\((.*)\)", term)
            if m:
                values = {v.strip() for v in m.group(2).split(",")}
                tests.append(lambda labels, k=m.group(1), vs=values: labels.get(k) in vs)
            else:
                k, _, v = term.partition("=")
                tests.append(lambda labels, k=k.strip(), v=v.strip().lstrip("="): labels.get(k) == v)
            continue
        depth += ch == "("
        depth -= ch == ")"
        current += ch
    return tests
