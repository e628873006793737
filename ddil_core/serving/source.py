"""Where a served student comes from: a local folder, s3://bucket/path, or registry://NAME/VERSION.

registry://NAME/VERSION looks the version up in the local registry folder (`--registry`, default registry.uri of
the default config) or, with `--kubeflow-registry HOST[:PORT]`, in a Kubeflow Model Registry, and serves what it
recorded: the version folder of a local registry, or the model artifact's storage URI. VERSION is a number
(3 or v3) or `latest` (also the meaning of registry://NAME).

`resolve_source` answers fast and raises ModelError (bad input, exit 2) for what can be checked before the
server starts: a missing or broken folder, an unknown model or version. The download of an s3:// student and
the pipeline load happen in `load_student`, which the server runs after it started listening (readiness false
until then).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ddil_core.models.pipeline_io import ModelError, check_model_folder, fetch_model, load_pipeline
from ddil_core.models.student_record import validate_student_folder

REGISTRY_SCHEME = "registry://"
_VERSION = re.compile(r"^v?(\d+)$")


@dataclass(frozen=True)
class ModelSource:
    uri: str  # as given on the command line
    location: str  # what is loaded: a local folder or an s3:// URI
    registry_entry: Optional[dict] = None  # the registry's record of registry://NAME/VERSION


def storage_location(uri: str) -> str:
    """A registry's recorded URI as something load_pipeline reads: file:// is a local path; minio:// (the default
    pipeline root of Kubeflow Pipelines, a MinIO bucket) is read through its S3 API."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://"):]
    return uri


def parse_registry_uri(uri: str) -> tuple[str, Optional[int]]:
    """registry://NAME[/VERSION] -> (NAME, version number or None for the latest)."""
    rest = uri[len(REGISTRY_SCHEME):].strip("/")
    name, _, version = rest.partition("/")
    if not name or "/" in version:
        raise ModelError(f"{uri}: expected registry://NAME/VERSION (VERSION a number, vN or latest)")
    if version in ("", "latest"):
        return name, None
    match = _VERSION.match(version)
    if not match:
        raise ModelError(f"{uri}: version '{version}' is not a number, vN or latest")
    return name, int(match.group(1))


def _from_local_registry(uri: str, root: str, name: str, version: Optional[int]) -> ModelSource:
    from ddil_core.registry import LocalRegistry, RegistryError

    try:
        entry = LocalRegistry(root).get(name, version)
    except (KeyError, RegistryError, ValueError) as exc:
        raise ModelError(f"{uri}: {exc.args[0] if exc.args else exc}") from None
    recorded = entry.get("model_uri") or entry["path"]
    location = storage_location(recorded) if "://" in recorded else entry["path"]
    return ModelSource(uri, location, entry)


def _from_kubeflow_registry(uri: str, address: str, name: str, version: Optional[int]) -> ModelSource:
    from ddil_core.registry import KubeflowRegistry

    host, _, port = address.rpartition(":") if re.search(r":\d+$", address) else (address, "", "8080")
    registry = KubeflowRegistry(host, int(port))
    if version is None:
        numbers = [int(m.group(1)) for v in registry.list_versions(name) if (m := _VERSION.match(str(v["version"])))]
        if not numbers:
            raise ModelError(f"{uri}: no versions of '{name}' in the Kubeflow Model Registry {address}")
        version = max(numbers)
    try:
        entry = registry.get(name, f"v{version}")
    except KeyError as exc:
        raise ModelError(f"{uri}: {exc.args[0]}") from None
    if not entry.get("uri"):
        raise ModelError(f"{uri}: the Kubeflow Model Registry has no model artifact URI for {name} v{version}")
    return ModelSource(uri, storage_location(entry["uri"]), entry)


def resolve_source(uri: str, registry: Optional[str] = None, kubeflow_registry: Optional[str] = None) -> ModelSource:
    """Check and resolve a served model's URI; raises ModelError naming the URI and the problem."""
    if uri.startswith(REGISTRY_SCHEME):
        name, version = parse_registry_uri(uri)
        if kubeflow_registry:
            source = _from_kubeflow_registry(uri, kubeflow_registry, name, version)
        else:
            from ddil_core.config.schema import RegistryConfig

            source = _from_local_registry(uri, registry or RegistryConfig().uri, name, version)
    elif uri.startswith("s3://"):
        source = ModelSource(uri, uri)
    elif "://" in uri:
        raise ModelError(f"{uri}: a served model is a folder, s3://bucket/path or registry://NAME/VERSION")
    else:
        source = ModelSource(uri, uri)
    if not source.location.startswith("s3://"):
        if not Path(source.location).is_dir():
            raise ModelError(f"model folder not found: {source.location}" +
                             (f" (recorded for {uri})" if source.location != uri else ""))
        check_model_folder(Path(source.location))
        validate_student_folder(source.location, "served model")  # refused at start, as `ddil sample` refuses it
    return source


@dataclass
class LoadedStudent:
    pipe: object
    info: Optional[dict]  # ddil_student.json (None for a folder without one: a teacher, sampled with DDIM)
    folder: Path


def load_student(source: ModelSource, device: Optional[str] = None, dtype: Optional[str] = None) -> LoadedStudent:
    """Download (s3://, cached) and load the pipeline, as every stage does (ddil_core.models.pipeline_io)."""
    folder = fetch_model(source.location)
    info = validate_student_folder(folder, "served model")  # an s3:// student: checked once downloaded
    pipe = load_pipeline(str(folder), dtype=dtype)
    if device:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedStudent(pipe, info, folder)
