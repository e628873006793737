"""Lineage of a student: the code, data and run that made it, recorded at distill time and carried to the registry.

distill writes `training_lineage(...)` into the student's ddil_student.json (key "lineage"), so the record travels
with the model folder wherever it is copied (a KFP artifact, a DVC cache, a registry version). register adds what
is known only then (`registration_lineage`: the dvc.lock of the working directory, the storage URI a serving runtime
pulls) and records the lot as the version's metadata: custom properties in the Kubeflow Model Registry, entry keys
and a model-card section in the local registry.

| key                   | what                                                                                     |
|-----------------------|------------------------------------------------------------------------------------------|
| git_sha               | commit of the code that trained: `git rev-parse HEAD` of ddil_core's checkout ("-dirty"  |
|                       | when tracked files changed), else $DDIL_GIT_SHA (the image's build arg), else absent     |
| dataset               | data.dataset as configured                                                               |
| dataset_sha256        | the data as read: sha256 over every sample's (key, caption, pixels) digest, in order     |
|                       | (cache-latents' manifest)                                                                |
| latent_cache_sha256   | sha256 of the latent cache's manifest.json (which lists every shard's sha256)            |
| rollouts_sha256       | sha256 over the rollout shards' manifest.json files, in shard order                      |
| run_id                | the pipeline run's id (telemetry.run_id / $DDIL_RUN_ID)                                  |
| kfp_run_id            | the Kubeflow Pipelines run id ($DDIL_KFP_RUN_ID, set by the KFP components)              |
| dvc_lock_sha256       | sha256 of ./dvc.lock when register runs inside a DVC project                             |
| model_s3_uri          | where the student lives on S3: an s3:// URI as given, or a KFP `minio://BUCKET/KEY`      |
|                       | artifact URI as `s3://BUCKET/KEY` (MinIO is the S3 API of a default KFP install)         |
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional

from ddil_core.config.redaction import redact_values

MANIFEST = "manifest.json"
STUDENT_INFO = "ddil_student.json"
LINEAGE_KEYS = ("git_sha", "dataset", "dataset_sha256", "latent_cache_sha256", "rollouts_sha256", "run_id",
                "kfp_run_id", "dvc_lock_sha256", "model_s3_uri")


def sha256_file(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def git_sha() -> Optional[str]:
    """The commit of the running ddil_core (see model_card.git_commit), or None when unknown."""
    from .model_card import git_commit

    sha = git_commit()
    return None if sha == "unknown" else sha


def rollout_manifests(folders: Iterable[str | Path]) -> list[Path]:
    """manifest.json of every rollout shard: a shard folder, or a folder of shard folders (as distill reads them)."""
    found = []
    for folder in map(Path, folders):
        if (folder / MANIFEST).is_file():
            found.append(folder / MANIFEST)
        elif folder.is_dir():
            found.extend(sorted(p / MANIFEST for p in folder.iterdir() if (p / MANIFEST).is_file()))
    return found


def rollouts_sha256(folders: Iterable[str | Path]) -> Optional[str]:
    manifests = rollout_manifests(folders)
    if not manifests:
        return None
    h = hashlib.sha256()
    for path in manifests:
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def training_lineage(config, latents: str | Path, rollouts: Iterable[str | Path]) -> dict:
    """What distill records in ddil_student.json: code, data, caches and run (None values are left out)."""
    manifest_path = Path(latents) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    record = {
        "git_sha": git_sha(),
        "dataset": config.data.dataset,
        "dataset_sha256": manifest.get("dataset_sha256"),
        "latent_cache_sha256": sha256_file(manifest_path),
        "rollouts_sha256": rollouts_sha256(rollouts),
        "run_id": config.telemetry.run_id or os.environ.get("DDIL_RUN_ID") or None,
        "kfp_run_id": os.environ.get("DDIL_KFP_RUN_ID") or None,
    }
    return redact_values({k: v for k, v in record.items() if v})


def s3_uri(uri: Optional[str]) -> Optional[str]:
    """An s3:// URI for a model location: s3:// as given, KFP's `minio://BUCKET/KEY` as `s3://BUCKET/KEY` (the
    same object in the same store, reached through its S3 endpoint: $AWS_ENDPOINT_URL, the KServe storage secret's
    s3-endpoint); None for anything else (a local path, gs://, ...)."""
    if not uri:
        return None
    uri = str(uri)
    if uri.startswith("s3://"):
        return uri
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://"):]
    return None


def student_lineage(student_dir: str | Path) -> dict:
    """The lineage distill recorded in a local student folder ({} for a remote URI or an older student)."""
    path = Path(str(student_dir)[len("file://"):] if str(student_dir).startswith("file://") else str(student_dir))
    try:
        info = json.loads((path / STUDENT_INFO).read_text())
    except (OSError, ValueError):
        return {}
    lineage = info.get("lineage") if isinstance(info, dict) else None
    return dict(lineage) if isinstance(lineage, dict) else {}


def registration_lineage(student_dir: str | Path, model_uri: Optional[str] = None,
                         workdir: Optional[str | Path] = None) -> dict:
    """The student's training lineage plus what register knows: the DVC lock, the KFP run, the s3:// URI. The git
    SHA is the trainer's only (recorded by distill): the code that registers may be another commit."""
    lineage = student_lineage(student_dir)
    lock = sha256_file(Path(workdir or os.getcwd()) / "dvc.lock")
    extra = {"dvc_lock_sha256": lock, "kfp_run_id": os.environ.get("DDIL_KFP_RUN_ID") or None,
             "model_s3_uri": s3_uri(model_uri) or s3_uri(str(student_dir))}
    for key, value in extra.items():
        if value and not lineage.get(key):
            lineage[key] = value
    return redact_values({k: lineage[k] for k in LINEAGE_KEYS if lineage.get(k)})


def model_source(lineage: dict) -> dict:
    """The Model Registry's model_source_* fields (model-registry 0.3.18 `register_model`) of a student made by a
    Kubeflow Pipelines run, as KFP's Model Registry integration names them (kubeflow/pipelines KEP-12020): kind
    "kfp", class "pipelinerun", group the namespace, id the run id, name the run's name. {} outside KFP."""
    run_id = lineage.get("kfp_run_id")
    if not run_id:
        return {}
    namespace = os.environ.get("DDIL_NAMESPACE")
    namespace_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")  # in a pod
    if not namespace and namespace_file.is_file():
        namespace = namespace_file.read_text().strip()
    source = {"model_source_kind": "kfp", "model_source_class": "pipelinerun", "model_source_group": namespace,
              "model_source_id": run_id, "model_source_name": os.environ.get("DDIL_KFP_RUN_NAME") or run_id}
    return {k: v for k, v in source.items() if v}
