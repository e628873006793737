"""A local HTTP stub of the Kubeflow Pipelines v2beta1 REST API, for testing `kfp` CLI / `kfp.Client` submissions.

The real KFP API server cannot run here (it needs a Kubernetes cluster, MySQL, object storage and Argo or Tekton),
so this stub implements only what the kfp 2.17 client calls to submit work, found by reading
kfp/client/client.py, kfp/cli/run.py and kfp_server_api/api/*.py:

  GET  /apis/v2beta1/healthz                                 Client() start-up (multi-user check)
  GET  /apis/v2beta1/experiments?filter=...                  create_experiment: look the name up first
  POST /apis/v2beta1/experiments                             create_experiment
  GET  /apis/v2beta1/experiments/{id}
  POST /apis/v2beta1/pipelines/upload?name=...               upload_pipeline (multipart field "uploadfile")
  POST /apis/v2beta1/pipelines/upload_version?pipelineid=... upload_pipeline_version (multipart)
  GET  /apis/v2beta1/pipelines?filter=...                    get_pipeline_id
  GET  /apis/v2beta1/pipelines/{id}[/versions[/{vid}]]
  POST /apis/v2beta1/runs                                    run_pipeline / `kfp run create` / `kfp run submit`
  GET  /apis/v2beta1/runs/{id}                               display of the created run
  GET  /apis/v2beta1/runs

Like the real server it checks what it is given: a run needs an existing experiment and either an inline pipeline
spec (a PipelineSpec, or {"pipeline_spec", "platform_spec"} when kfp-kubernetes settings are present) or a
reference to an uploaded version; every runtime parameter must be an input of the pipeline's root with a value of
the declared type; required inputs (no default, not optional) must be given. Errors answer 400/404 with the
{"error", "code", "message"} body of grpc-gateway. Every request is recorded in `stub.requests` (method, path,
query, json body or uploaded files) for the tests to inspect.

Standalone: python -m tests.fakes.kfp_api_stub --port 8888   (then: kfp --endpoint http://127.0.0.1:8888 run create ...)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import email.parser
import email.policy
import json
import threading
import time
import uuid
from typing import Any, Optional
from urllib.parse import parse_qs, urlparse

import yaml

from tests.fakes.http_stub import HttpStub, StubRequest

PREFIX = "/apis/v2beta1"

# PipelineSpec parameter types -> accepted JSON value types (bool is not an int here).
_PARAM_TYPES = {
    "STRING": (str,),
    "NUMBER_INTEGER": (int,),
    "NUMBER_DOUBLE": (int, float),
    "BOOLEAN": (bool,),
    "LIST": (list,),
    "STRUCT": (dict,),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _filter_value(raw: Optional[str], key: str) -> Optional[str]:
    """The EQUALS string value of `key` in a kfp list filter ({"predicates": [...]}), if any."""
    if not raw:
        return None
    try:
        predicates = json.loads(raw).get("predicates", [])
    except (ValueError, AttributeError):
        raise ApiError(400, f"invalid filter: {raw}") from None
    for p in predicates:
        if p.get("key") == key and p.get("operation") in ("EQUALS", 1):
            return p.get("string_value", p.get("stringValue"))
    return None


def split_pipeline_doc(doc: Any) -> tuple[dict, dict]:
    """(pipeline_spec, platform_spec) from what a client sends or uploads."""
    if isinstance(doc, dict) and "pipeline_spec" in doc:
        return doc["pipeline_spec"], doc.get("platform_spec") or {}
    if isinstance(doc, dict):
        return doc, {}
    raise ApiError(400, "pipeline_spec must be an object")


def parse_package(data: bytes) -> dict:
    """An uploaded pipeline package (.yaml with one or two documents) -> {"pipeline_spec", "platform_spec"}."""
    try:
        docs = [d for d in yaml.safe_load_all(data.decode("utf-8")) if d is not None]
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ApiError(400, f"invalid pipeline package: {exc}") from None
    if not docs:
        raise ApiError(400, "invalid pipeline package: empty")
    platform: dict = {}
    for extra in docs[1:]:
        platform.update(extra)
    check_pipeline_spec(docs[0])
    return {"pipeline_spec": docs[0], "platform_spec": platform}


def check_pipeline_spec(spec: dict) -> None:
    for key in ("pipelineInfo", "root", "deploymentSpec", "schemaVersion"):
        if key not in spec:
            raise ApiError(400, f"invalid pipeline spec: missing '{key}'")
    if not spec["pipelineInfo"].get("name"):
        raise ApiError(400, "invalid pipeline spec: pipelineInfo.name is empty")


def check_runtime_parameters(spec: dict, parameters: dict) -> None:
    """Every parameter is a root input of the declared type; required root inputs are given."""
    declared = (spec.get("root", {}).get("inputDefinitions", {}) or {}).get("parameters", {}) or {}
    for name, value in (parameters or {}).items():
        if name not in declared:
            raise ApiError(400, f"runtime parameter '{name}' is not an input of the pipeline "
                                f"(inputs: {sorted(declared)})")
        ptype = declared[name].get("parameterType")
        ok = _PARAM_TYPES.get(ptype)
        if ok and (not isinstance(value, ok) or (ptype != "BOOLEAN" and isinstance(value, bool))):
            raise ApiError(400, f"runtime parameter '{name}' = {value!r} is not of type {ptype}")
    for name, definition in declared.items():
        if name not in (parameters or {}) and "defaultValue" not in definition and not definition.get("isOptional"):
            raise ApiError(400, f"required runtime parameter '{name}' is missing")


class KfpApiStub(HttpStub):
    """The stub server, on 127.0.0.1 and a free port; use as a context manager."""

    methods = ("GET", "POST", "DELETE")

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.bind = (host, port)
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}  # version id -> version (with its pipeline_spec)
        self.runs: dict[str, dict] = {}
        self._lock = threading.Lock()

    def handle(self, request: StubRequest) -> None:
        method = request.command
        url = urlparse(request.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        body = request.body()
        record: dict[str, Any] = {"method": method, "path": url.path, "query": query,
                                  "headers": dict(request.headers.items())}
        try:
            ctype = request.headers.get("Content-Type", "")
            if ctype.startswith("multipart/form-data"):
                record["files"] = _multipart_files(ctype, body)
            elif body:
                try:
                    record["json"] = json.loads(body)
                except ValueError:
                    raise ApiError(400, "request body is not JSON") from None
            with self._lock:
                self.requests.append(record)
                status, payload = self.dispatch(method, url.path, query, record)
        except ApiError as exc:
            status, payload = exc.status, {"error": exc.message, "code": _grpc_code(exc.status),
                                           "message": exc.message}
        record["status"] = status
        request.send_json(status, payload)

    def calls(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == PREFIX + path]

    # ------------------------------------------------------------------------------------------------ routes
    def dispatch(self, method: str, path: str, query: dict, record: dict) -> tuple[int, dict]:
        if not path.startswith(PREFIX):
            raise ApiError(404, f"no route {path}")
        parts = [p for p in path[len(PREFIX):].split("/") if p]
        body = record.get("json") or {}
        if parts == ["healthz"] and method == "GET":
            return 200, {"multi_user": False}
        if parts[:1] == ["experiments"]:
            return self._experiments(method, parts[1:], query, body)
        if parts[:1] == ["pipelines"]:
            return self._pipelines(method, parts[1:], query, body, record)
        if parts[:1] == ["runs"]:
            return self._runs(method, parts[1:], query, body)
        raise ApiError(404, f"no route {method} {path}")

    def _experiments(self, method, rest, query, body):
        if not rest and method == "POST":
            name = body.get("display_name")
            if not name:
                raise ApiError(400, "experiment display_name is empty")
            if any(e["display_name"] == name for e in self.experiments.values()):
                raise ApiError(409, f"experiment '{name}' already exists")
            exp = {"experiment_id": str(uuid.uuid4()), "display_name": name,
                   "description": body.get("description") or "", "namespace": body.get("namespace") or "",
                   "created_at": _now(), "storage_state": "AVAILABLE"}
            self.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if not rest and method == "GET":
            name = _filter_value(query.get("filter"), "display_name")
            found = [e for e in self.experiments.values() if name is None or e["display_name"] == name]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if len(rest) == 1 and method == "GET":
            if rest[0] not in self.experiments:
                raise ApiError(404, f"experiment {rest[0]} not found")
            return 200, self.experiments[rest[0]]
        raise ApiError(404, f"no route {method} experiments/{'/'.join(rest)}")

    def _new_version(self, pipeline_id: str, name: str, doc: dict, description: str = "") -> dict:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": str(uuid.uuid4()), "display_name": name,
                   "name": name, "description": description, "created_at": _now(), "pipeline_spec": doc}
        self.versions[version["pipeline_version_id"]] = version
        return version

    def _pipelines(self, method, rest, query, body, record):
        if rest == ["upload"] and method == "POST":
            files = record.get("files") or {}
            if "uploadfile" not in files:
                raise ApiError(400, "missing the uploadfile form field")
            name = query.get("display_name") or query.get("name") or files["uploadfile"]["filename"]
            if any(p["display_name"] == name for p in self.pipelines.values()):
                raise ApiError(409, f"pipeline '{name}' already exists")
            doc = parse_package(files["uploadfile"]["data"])
            pipeline = {"pipeline_id": str(uuid.uuid4()), "display_name": name, "name": query.get("name") or name,
                        "description": query.get("description") or "", "created_at": _now(),
                        "namespace": query.get("namespace") or ""}
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            self._new_version(pipeline["pipeline_id"], name, doc, pipeline["description"])
            return 200, pipeline
        if rest == ["upload_version"] and method == "POST":
            files = record.get("files") or {}
            pid = query.get("pipelineid")
            if pid not in self.pipelines:
                raise ApiError(404, f"pipeline {pid} not found")
            if "uploadfile" not in files:
                raise ApiError(400, "missing the uploadfile form field")
            name = query.get("display_name") or query.get("name") or files["uploadfile"]["filename"]
            doc = parse_package(files["uploadfile"]["data"])
            return 200, _public_version(self._new_version(pid, name, doc, query.get("description") or ""))
        if not rest and method == "GET":
            name = _filter_value(query.get("filter"), "display_name") or _filter_value(query.get("filter"), "name")
            found = [p for p in self.pipelines.values() if name is None or name in (p["display_name"], p["name"])]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if len(rest) == 1 and method == "GET":
            if rest[0] not in self.pipelines:
                raise ApiError(404, f"pipeline {rest[0]} not found")
            return 200, self.pipelines[rest[0]]
        if len(rest) == 2 and rest[1] == "versions" and method == "GET":
            found = [_public_version(v) for v in self.versions.values() if v["pipeline_id"] == rest[0]]
            return 200, {"pipeline_versions": found, "total_size": len(found)} if found else {}
        if len(rest) == 3 and rest[1] == "versions" and method == "GET":
            version = self.versions.get(rest[2])
            if version is None or version["pipeline_id"] != rest[0]:
                raise ApiError(404, f"pipeline version {rest[2]} not found")
            return 200, version
        raise ApiError(404, f"no route {method} pipelines/{'/'.join(rest)}")

    def _runs(self, method, rest, query, body):
        if not rest and method == "POST":
            if not body.get("display_name"):
                raise ApiError(400, "run display_name is empty")
            if body.get("experiment_id") not in self.experiments:
                raise ApiError(404, f"experiment {body.get('experiment_id')} not found")
            ref = body.get("pipeline_version_reference") or {}
            if body.get("pipeline_spec"):
                spec, _ = split_pipeline_doc(body["pipeline_spec"])
                check_pipeline_spec(spec)
            elif ref.get("pipeline_version_id"):
                version = self.versions.get(ref["pipeline_version_id"])
                if version is None or version["pipeline_id"] != ref.get("pipeline_id"):
                    raise ApiError(404, f"pipeline version {ref} not found")
                spec, _ = split_pipeline_doc(version["pipeline_spec"])
            else:
                raise ApiError(400, "a run needs pipeline_spec or pipeline_version_reference")
            parameters = (body.get("runtime_config") or {}).get("parameters") or {}
            check_runtime_parameters(spec, parameters)
            run = dict(body, run_id=str(uuid.uuid4()), created_at=_now(), state="PENDING",
                       storage_state="AVAILABLE")
            self.runs[run["run_id"]] = run
            return 200, run
        if not rest and method == "GET":
            runs = list(self.runs.values())
            return 200, {"runs": runs, "total_size": len(runs)} if runs else {}
        if len(rest) == 1 and method == "GET":
            if rest[0] not in self.runs:
                raise ApiError(404, f"run {rest[0]} not found")
            return 200, self.runs[rest[0]]
        raise ApiError(404, f"no route {method} runs/{'/'.join(rest)}")


def _public_version(version: dict) -> dict:
    return {k: v for k, v in version.items() if k != "pipeline_spec"}


def _grpc_code(status: int) -> int:
    return {400: 3, 404: 5, 409: 6}.get(status, 13)


def _multipart_files(content_type: str, body: bytes) -> dict:
    """{field: {"filename", "data"}} of a multipart/form-data body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    files = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            files[name] = {"filename": part.get_filename() or "", "data": part.get_payload(decode=True) or b""}
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8888)
    args = parser.parse_args(argv)
    with KfpApiStub(port=args.port) as stub:
        print(f"KFP v2beta1 API stub on {stub.url} (Ctrl-C stops)")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    for r in stub.requests:
        print(r["method"], r["path"], r.get("status"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
