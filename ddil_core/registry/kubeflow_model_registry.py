"""Registration in a Kubeflow Model Registry through its Python client (model-registry==0.3.18).

`ModelRegistry.register_model(...)` of that client issues these REST calls (all under
`/api/model_registry/v1`, read from model_registry/_client.py, core.py and mr_openapi's ModelRegistryServiceApi):

| when                                  | request                                                             |
|---------------------------------------|---------------------------------------------------------------------|
| client constructor (connection check) | GET  /registered_models?pageSize=1                                  |
| find the registered model             | GET  /registered_model?name=NAME            (404: not registered)   |
| create it when missing                | POST /registered_models                     {name, owner}           |
| refuse an existing version            | GET  /model_version?name=VERSION&parentResourceId=RM_ID (404: free) |
| create the version                    | POST /model_versions                        {name, author, registeredModelId, description, customProperties} |
| attach the model artifact             | POST /model_versions/{MV_ID}/artifacts      {artifactType: model-artifact, name, uri, modelFormatName, modelFormatVersion} |

Listing versions (to pick the next number) adds GET /registered_model?name=NAME and
GET /registered_models/{RM_ID}/versions?pageSize=...; reading one back adds GET /model_version?... .

Metrics travel as the version's custom properties, flat scalars named `<metric>_<model>` (`fid_student`,
`coverage_teacher`, ...), with the gate results (`gate_<name>_passed`), the data and code versions and the
model card (`model_card`, Markdown). The model format is "diffusers"; its version is the diffusers version that
wrote the student (model_index.json `_diffusers_version`) when it can be read.

Credentials: the client reads a bearer token from `user_token`, or from the file named by
$KF_PIPELINES_SA_TOKEN_PATH, or from the pod's service-account token; nothing is read from the repo.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .model_card import is_sensitive, redact, redact_string

MODEL_FORMAT = "diffusers"
_VERSION_NAME = re.compile(r"^v?(\d+)$")
_MAX_VERSION_RETRIES = 5


def storage_uri(student: str) -> str:
    """The URI recorded for the model artifact: remote URIs as given, local folders as absolute file:// URIs."""
    student = os.fspath(student)
    if "://" in student:
        return student
    return Path(student).resolve().as_uri()


def model_format_version(student: str) -> str:
    """The diffusers version that saved the student (model_index.json), else the installed diffusers, else '1'."""
    s = os.fspath(student)
    local = s[len("file://") :] if s.startswith("file://") else s
    if "://" not in local:
        try:
            data = json.loads((Path(local) / "model_index.json").read_text())
            if isinstance(data, dict) and isinstance(data.get("_diffusers_version"), str):
                return data["_diffusers_version"]
        except (OSError, ValueError):
            pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("diffusers")
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    return "1"


def _scalar(value: Any) -> Optional[Any]:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return redact_string(value)
    return None


def flat_metadata(metrics: dict) -> dict[str, Any]:
    """metrics.json as flat scalars: models.student.fid -> fid_student; protocol.x -> protocol_x."""
    out: dict[str, Any] = {}
    models = metrics.get("models") if isinstance(metrics, dict) else None
    if isinstance(models, dict):
        for model, values in models.items():
            if not isinstance(values, dict):
                continue
            for key, value in values.items():
                v = _scalar(value)
                if v is not None and not is_sensitive(key):
                    out[f"{key}_{model}"] = v
    protocol = metrics.get("protocol") if isinstance(metrics, dict) else None
    if isinstance(protocol, dict):
        for key, value in redact(protocol).items():
            v = _scalar(value)
            if v is not None:
                out[f"protocol_{key}"] = v
    return out


def _version_number(name: Any) -> Optional[int]:
    m = _VERSION_NAME.match(str(name))
    return int(m.group(1)) if m else None


class _DropPortHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "You may want to verify the configuration" not in record.getMessage()


class KubeflowRegistry:
    def __init__(
        self,
        address: str,
        port: int = 8080,
        author: str = "ddil",
        is_secure: bool = False,
        user_token: Optional[str] = None,
    ):
        try:
            from model_registry import ModelRegistry
        except ImportError as exc:  # pragma: no cover - the optional extra is missing
            raise RuntimeError(
                "registry.kubeflow_address is set but the Kubeflow Model Registry client is not installed; "
                "install it with: pip install 'ddil[registry]' (model-registry==0.3.18)"
            ) from exc
        if "://" not in address:
            address = ("https://" if is_secure else "http://") + address
        self.address = address
        self.port = int(port)
        self.author = author
        client_logger = logging.getLogger("model-registry")
        port_hint = _DropPortHint()
        client_logger.addFilter(port_hint)  # "http:// but port is not 80": in-cluster services use 8080
        try:
            with warnings.catch_warnings():
                if not is_secure:  # no token is needed on a plain-HTTP (in-cluster) connection
                    warnings.filterwarnings("ignore", message="User access token is missing")
                self.client = ModelRegistry(
                    address, self.port, author=author, is_secure=is_secure, user_token=user_token
                )
        finally:
            client_logger.removeFilter(port_hint)

    # ------------------------------------------------------------------------------------------------------------

    def list_versions(self, name: str) -> list[dict]:
        if self.client.get_registered_model(name) is None:
            return []
        out = []
        for mv in self.client.get_model_versions(name):
            out.append(
                {
                    "name": name,
                    "version": mv.name,
                    "model_version_id": mv.id,
                    "author": mv.author,
                    "description": mv.description,
                    "metadata": dict(mv.custom_properties or {}),
                    "created": mv.create_time_since_epoch,
                }
            )
        return out

    def get(self, name: str, version: str) -> dict:
        from model_registry.exceptions import StoreError

        try:
            mv = self.client.get_model_version(name, str(version))
        except StoreError:
            mv = None
        if mv is None:
            raise KeyError(f"model '{name}' has no version {version} in the Kubeflow Model Registry {self.address}")
        art = self.client.get_model_artifact(name, str(version))
        return {
            "name": name,
            "version": mv.name,
            "model_version_id": mv.id,
            "metadata": dict(mv.custom_properties or {}),
            "uri": getattr(art, "uri", None),
            "model_format_name": getattr(art, "model_format_name", None),
        }

    def _next_version(self, name: str) -> int:
        numbers = [n for n in (_version_number(v["version"]) for v in self.list_versions(name)) if n is not None]
        return max(numbers, default=0) + 1

    def register(
        self,
        name: str,
        student: str,
        metrics: dict,
        card_markdown: Union[str, Callable[[str, str], str], None] = None,
        extra: Optional[dict] = None,
        version: Optional[str] = None,
        uri: Optional[str] = None,
        model_source: Optional[dict] = None,
    ) -> dict:
        """Register `student` (its storage URI, or `uri` when given: the s3:// location of the same folder) as a new
        version of `name`; returns an entry dict. `model_source`: model_source_kind/class/group/id/name of the
        model artifact (lineage.model_source: the KFP run that made it).

        version None: the next free 'vN'. card_markdown: Markdown, or a callable (version name, uri) -> Markdown,
        stored as the `model_card` custom property. extra: scalars added to the version's metadata (`gates`: the gate
        results, recorded as gate_<name>_passed and in the entry).
        """
        from model_registry.exceptions import StoreError

        extra = dict(extra or {})
        gates = extra.pop("gates", [])
        uri = uri or storage_uri(student)
        source = {k: str(v) for k, v in (model_source or {}).items() if k.startswith("model_source_") and v}
        metadata = flat_metadata(metrics)
        for g in gates:
            d = g if isinstance(g, dict) else g.to_dict()
            metadata[f"gate_{d['name']}_passed"] = bool(d.get("passed"))
        for key, value in extra.items():
            v = _scalar(value)
            if v is not None and not is_sensitive(key):
                metadata.setdefault(key, v)
        models = metrics.get("models") if isinstance(metrics, dict) else None
        student_metrics = models.get("student") if isinstance(models, dict) else None
        student_metrics = student_metrics if isinstance(student_metrics, dict) else {}
        description = "DDIL few-step student"
        if isinstance(student_metrics.get("steps"), int):
            description += f", {student_metrics['steps']} steps"
        if isinstance(student_metrics.get("fid"), (int, float)):
            description += f", FID {student_metrics['fid']:.4g}"
        fmt_version = model_format_version(student)

        auto = version is None
        number = self._next_version(name) if auto else _version_number(version)
        last_error: Optional[Exception] = None
        for _ in range(_MAX_VERSION_RETRIES if auto else 1):
            version_name = f"v{number}" if auto else str(version)
            card = card_markdown(version_name, uri) if callable(card_markdown) else card_markdown
            if card:
                metadata["model_card"] = card
            try:
                rm = self.client.register_model(
                    name,
                    uri,
                    model_format_name=MODEL_FORMAT,
                    model_format_version=fmt_version,
                    version=version_name,
                    version_description=description,
                    metadata=metadata,
                    **source,
                )
                break
            except StoreError as exc:  # a concurrent registration took this version: take the next one
                if not auto or "already exists" not in str(exc):
                    raise
                last_error = exc
                number += 1
        else:
            raise RuntimeError(f"could not allocate a version of '{name}': {last_error}")
        mv = self.client.get_model_version(name, version_name)
        return {
            "name": name,
            "version": version_name,
            "version_number": number,
            "registry": "kubeflow",
            "address": f"{self.address}:{self.port}" if not re.search(r":\d+$", self.address) else self.address,
            "registered_model_id": rm.id,
            "model_version_id": getattr(mv, "id", None),
            "uri": uri,
            "model_format_name": MODEL_FORMAT,
            "model_format_version": fmt_version,
            "metrics": metrics,
            "metadata": {k: v for k, v in metadata.items() if k != "model_card"},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "gates": [g if isinstance(g, dict) else g.to_dict() for g in gates],
            "source": redact_string(os.fspath(student)),
            **source,
        }
