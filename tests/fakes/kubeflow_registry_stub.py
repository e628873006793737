"""A small in-memory stand-in for the Kubeflow Model Registry REST API, for tests.

The real Kubeflow Model Registry server (a Go service backed by MySQL/PostgreSQL or ML Metadata, deployed on
Kubernetes) cannot run on the test machines (no cluster, no container engine, no network), so the tests talk to
this stub instead. It implements the subset of `/api/model_registry/v1` that the `model-registry==0.3.18`
Python client calls for `ModelRegistry(...)`, `register_model(...)`, `get_registered_model`, `get_model_version`,
`get_model_versions` and `get_model_artifact`, with responses shaped like the server's OpenAPI schema
(ids and epoch-millisecond times as strings, `state`, `customProperties` as typed MetadataValue objects,
404 with `{"code", "message"}` when a find matches nothing, 409 on a duplicate name). It records every request
(method, path, query, JSON body, Authorization header present or not) in `stub.requests`.

It validates nothing beyond what the tests need; it is not a conformance test of the real server.

    with KubeflowRegistryStub() as stub:
        ModelRegistry("http://127.0.0.1", stub.port, author="me", is_secure=False)
        stub.requests  # [{"method": "GET", "path": "/api/model_registry/v1/registered_models", ...}]
"""
from __future__ import annotations

import itertools
import json
import re
import threading
import time
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

from tests.fakes.http_stub import HttpStub, StubRequest

PREFIX = "/api/model_registry/v1"


class _NotFound(Exception):
    pass


class _Conflict(Exception):
    pass


class KubeflowRegistryStub(HttpStub):
    methods = ("GET", "POST", "PATCH")

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.registered_models: dict[str, dict] = {}
        self.model_versions: dict[str, dict] = {}
        self.artifacts: dict[str, dict] = {}
        self.version_artifacts: dict[str, list[str]] = {}  # model version id -> artifact ids
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------------------
    # HTTP

    def handle(self, request: StubRequest) -> None:
        raw = request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        parts = urlsplit(request.path)
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        with self._lock:
            self.requests.append(
                {
                    "method": request.command,
                    "path": parts.path,
                    "query": query,
                    "body": body,
                    "authorization": "Authorization" in request.headers,
                }
            )
            try:
                status, payload = self._route(request.command, parts.path, query, body)
            except _NotFound as exc:
                status, payload = 404, {"code": "404", "message": str(exc)}
            except _Conflict as exc:
                status, payload = 409, {"code": "409", "message": str(exc)}
            except (KeyError, TypeError, ValueError) as exc:
                status, payload = 400, {"code": "400", "message": f"bad request: {exc}"}
        request.send_json(status, payload)

    # ------------------------------------------------------------------------------------------------------------
    # helpers for tests

    def calls(self, method: Optional[str] = None) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests if method is None or r["method"] == method]

    # ------------------------------------------------------------------------------------------------------------
    # resources

    def _new(self, body: dict, **defaults: Any) -> dict:
        now = str(int(time.time() * 1000))
        obj = dict(defaults)
        obj.update({k: v for k, v in body.items() if v is not None})
        obj["id"] = str(next(self._ids))
        obj["createTimeSinceEpoch"] = now
        obj["lastUpdateTimeSinceEpoch"] = now
        obj.setdefault("customProperties", {})
        return obj

    @staticmethod
    def _page(items: list[dict], query: dict) -> dict:
        size = int(query.get("pageSize") or 100)
        start = int(query.get("nextPageToken") or 0)
        page = items[start : start + size]
        more = start + size < len(items)
        return {"items": page, "nextPageToken": str(start + size) if more else "", "pageSize": size, "size": len(page)}

    def _find(self, pool: dict, query: dict, parent_key: Optional[str] = None, what: str = "entity") -> dict:
        name, external_id, parent = query.get("name"), query.get("externalId"), query.get("parentResourceId")
        for obj in pool.values():
            if external_id is not None and obj.get("externalId") == external_id:
                return obj
            if name is not None and obj.get("name") == name and (parent is None or obj.get(parent_key) == parent):
                return obj
        raise _NotFound(f"no {what} found for {query}")

    def _route(self, method: str, path: str, query: dict, body: Any) -> tuple[int, dict]:
        if not path.startswith(PREFIX):
            raise _NotFound(f"unknown path {path}")
        p = path[len(PREFIX) :]

        # registered models
        if p == "/registered_models" and method == "GET":
            return 200, self._page(list(self.registered_models.values()), query)
        if p == "/registered_models" and method == "POST":
            if any(rm["name"] == body["name"] for rm in self.registered_models.values()):
                raise _Conflict(f"registered model {body['name']!r} already exists")
            rm = self._new(body, state="LIVE")
            self.registered_models[rm["id"]] = rm
            return 201, rm
        if p == "/registered_model" and method == "GET":
            return 200, self._find(self.registered_models, query, what="registered model")
        m = re.fullmatch(r"/registered_models/([^/]+)", p)
        if m:
            rm = self.registered_models.get(m.group(1))
            if rm is None:
                raise _NotFound(f"registered model {m.group(1)} not found")
            if method == "PATCH":
                rm.update(body or {})
            return 200, rm
        m = re.fullmatch(r"/registered_models/([^/]+)/versions", p)
        if m:
            if m.group(1) not in self.registered_models:
                raise _NotFound(f"registered model {m.group(1)} not found")
            if method == "POST":
                return self._create_version(dict(body, registeredModelId=m.group(1)))
            versions = [v for v in self.model_versions.values() if v["registeredModelId"] == m.group(1)]
            return 200, self._page(versions, query)

        # model versions
        if p == "/model_versions" and method == "POST":
            return self._create_version(body)
        if p == "/model_versions" and method == "GET":
            return 200, self._page(list(self.model_versions.values()), query)
        if p == "/model_version" and method == "GET":
            return 200, self._find(self.model_versions, query, "registeredModelId", "model version")
        m = re.fullmatch(r"/model_versions/([^/]+)", p)
        if m:
            mv = self.model_versions.get(m.group(1))
            if mv is None:
                raise _NotFound(f"model version {m.group(1)} not found")
            if method == "PATCH":
                mv.update(body or {})
            return 200, mv
        m = re.fullmatch(r"/model_versions/([^/]+)/artifacts", p)
        if m:
            mv_id = m.group(1)
            if mv_id not in self.model_versions:
                raise _NotFound(f"model version {mv_id} not found")
            if method == "POST":
                if body.get("id") and body["id"] in self.artifacts:
                    art = self.artifacts[body["id"]]
                    art.update(body)
                    return 200, art
                art = self._new(body, artifactType="model-artifact", state="LIVE")
                self.artifacts[art["id"]] = art
                self.version_artifacts.setdefault(mv_id, []).append(art["id"])
                return 201, art
            arts = [self.artifacts[a] for a in self.version_artifacts.get(mv_id, [])]
            return 200, self._page(arts, query)

        # model artifacts
        if p == "/model_artifact" and method == "GET":
            parent = query.get("parentResourceId")
            pool = self.artifacts
            if parent is not None:
                pool = {a: self.artifacts[a] for a in self.version_artifacts.get(parent, [])}
            return 200, self._find(pool, {k: v for k, v in query.items() if k != "parentResourceId"}, what="model artifact")
        m = re.fullmatch(r"/model_artifacts/([^/]+)", p)
        if m and method == "GET":
            if m.group(1) not in self.artifacts:
                raise _NotFound(f"model artifact {m.group(1)} not found")
            return 200, self.artifacts[m.group(1)]
        if p == "/model_artifacts" and method == "GET":
            return 200, self._page(list(self.artifacts.values()), query)

        raise _NotFound(f"{method} {path} is not implemented by the stub")

    def _create_version(self, body: dict) -> tuple[int, dict]:
        rm_id = body.get("registeredModelId")
        if rm_id not in self.registered_models:
            raise _NotFound(f"registered model {rm_id} not found")
        if any(v["registeredModelId"] == rm_id and v["name"] == body["name"] for v in self.model_versions.values()):
            raise _Conflict(f"model version {body['name']!r} already exists for registered model {rm_id}")
        mv = self._new(body, state="LIVE")
        self.model_versions[mv["id"]] = mv
        return 201, mv
