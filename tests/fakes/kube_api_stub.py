"""A local HTTP stub of the Kubernetes API server for InferenceServices, for testing the pipeline's deploy step.

A real API server with KServe's controller cannot run here (no cluster, no container engine), so this stub
implements what the `kubernetes` client calls for `CustomObjectsApi` create / get / replace of
serving.kserve.io/v1beta1 inferenceservices, with the API server's answers: 201 on create, 409 AlreadyExists,
404 NotFound, 409 Conflict on a stale resourceVersion, 422 Invalid when the body fails the CRD's schema (KServe
0.20.0's, tests/fakes/schemas/, checked strictly as `kubectl apply --validate=strict` does: unknown fields are errors),
`metav1.Status` bodies for errors; resourceVersion and generation are kept as the API server keeps them.
It also plays KServe's controller: a stored service turns Ready (status.conditions, observedGeneration, url)
after `ready_after_gets` reads of it, or never when that is None. Every request is recorded in `stub.requests`.
"""
from __future__ import annotations

import copy
import gzip
import itertools
import json
import re
import threading
from pathlib import Path
from typing import Any, Optional

from tests.fakes.http_stub import HttpStub, StubRequest

SCHEMA_FILE = Path(__file__).resolve().parent / "schemas" / "kserve-v0.20.0-inferenceservice-v1beta1.json.gz"
_PATH = re.compile(r"^/apis/serving\.kserve\.io/v1beta1/namespaces/([^/]+)/inferenceservices(?:/([^/]+))?$")


def strict(schema: Any) -> Any:
    """The schema with unknown fields rejected wherever the CRD does not preserve them (server-side strict field
    validation); int-or-string fields accept both."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_validator():
    import jsonschema

    record = json.loads(gzip.decompress(SCHEMA_FILE.read_bytes()))
    return jsonschema.Draft7Validator(strict(record["schema"]))


def schema_errors(obj: dict, validator=None) -> list[str]:
    validator = validator or crd_validator()
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


class KubeApiStub(HttpStub):
    methods = ("GET", "POST", "PUT", "DELETE")
    protocol_version = "HTTP/1.0"  # one request per connection, as this stub has always answered

    def __init__(self, ready_after_gets: Optional[int] = 2) -> None:
        self.ready_after_gets = ready_after_gets
        self.objects: dict[tuple[str, str], dict] = {}
        self.requests: list[dict] = []
        self._gets: dict[tuple[str, str], int] = {}
        self._versions = itertools.count(1000)
        self._lock = threading.Lock()
        self._validator = crd_validator()

    def kubeconfig(self, path: Path, namespace: str = "ddil") -> Path:
        """A kubeconfig file that points the kubernetes client at this stub."""
        import yaml

        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "stub",
            "clusters": [{"name": "stub", "cluster": {"server": self.url}}],
            "users": [{"name": "stub", "user": {"token": "stub-token"}}],
            "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub", "namespace": namespace}}]}))
        return path

    # ------------------------------------------------------------------------------------------------------------

    def handle(self, request: StubRequest) -> None:
        raw = request.body()
        body = json.loads(raw) if raw else None
        self.requests.append({"method": request.command, "path": request.path, "json": body,
                              "authorization": request.headers.get("Authorization")})
        request.send_json(*self._route(request.command, request.path.split("?")[0], body))

    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _status(code: int, reason: str, message: str) -> tuple[int, dict]:
        return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code}

    def _invalid(self, body: Any, namespace: str, name: Optional[str]) -> Optional[tuple[int, dict]]:
        if not isinstance(body, dict):
            return self._status(400, "BadRequest", "the body is not a JSON object")
        meta = body.get("metadata") or {}
        if (body.get("apiVersion"), body.get("kind")) != ("serving.kserve.io/v1beta1", "InferenceService"):
            return self._status(400, "BadRequest", f"wrong apiVersion/kind {body.get('apiVersion')}/{body.get('kind')}")
        if meta.get("namespace", namespace) != namespace or (name is not None and meta.get("name") != name):
            return self._status(400, "BadRequest", "metadata.name/namespace do not match the request path")
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", meta.get("name") or ""):
            return self._status(422, "Invalid", f"metadata.name {meta.get('name')!r}: not a DNS-1035 label")
        errors = schema_errors(body, self._validator)
        if errors:
            return self._status(422, "Invalid", f"InferenceService {meta.get('name')} is invalid: " + "; ".join(errors))
        return None

    def _stored(self, body: dict, namespace: str, generation: int) -> dict:
        obj = copy.deepcopy(body)
        obj.pop("status", None)
        meta = obj.setdefault("metadata", {})
        meta.update(namespace=namespace, resourceVersion=str(next(self._versions)), generation=generation)
        meta.setdefault("uid", f"uid-{meta['name']}")
        return obj

    def _route(self, method: str, path: str, body: Any) -> tuple[int, dict]:
        match = _PATH.match(path)
        if not match:
            return self._status(404, "NotFound", f"the server could not find the requested resource ({path})")
        namespace, name = match.groups()
        with self._lock:
            if method == "POST" and name is None:
                problem = self._invalid(body, namespace, None)
                if problem:
                    return problem
                key = (namespace, body["metadata"]["name"])
                if key in self.objects:
                    return self._status(409, "AlreadyExists",
                                        f'inferenceservices.serving.kserve.io "{key[1]}" already exists')
                self.objects[key] = self._stored(body, namespace, 1)
                self._gets[key] = 0
                return 201, self.objects[key]
            key = (namespace, name)
            if key not in self.objects:
                return self._status(404, "NotFound", f'inferenceservices.serving.kserve.io "{name}" not found')
            if method == "GET":
                self._gets[key] += 1
                obj = self.objects[key]
                ready = self.ready_after_gets is not None and self._gets[key] >= self.ready_after_gets
                gen = obj["metadata"]["generation"]
                obj["status"] = {
                    "observedGeneration": gen if ready else gen - 1,
                    "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                    **({} if ready else {"reason": "Deploying", "message": "pods starting"})}],
                    **({"url": f"http://{name}.{namespace}.example.com"} if ready else {})}
                return 200, obj
            if method == "PUT":
                problem = self._invalid(body, namespace, name)
                if problem:
                    return problem
                current = self.objects[key]
                if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                    return self._status(409, "Conflict", f'Operation cannot be fulfilled on inferenceservices '
                                                         f'"{name}": the object has been modified')
                generation = current["metadata"]["generation"] + (body.get("spec") != current.get("spec"))
                self.objects[key] = self._stored(body, namespace, generation)
                self._gets[key] = 0
                return 200, self.objects[key]
        return self._status(405, "MethodNotAllowed", f"{method} {path}")
