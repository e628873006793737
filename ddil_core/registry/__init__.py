"""The register stage's library: quality gates, model cards, a local registry and a Kubeflow Model Registry adapter.

`register_student(config, student_dir, metrics)` checks the gates of `config.registry.gates` first; when any
fails it raises GateError (naming every failed gate with its actual value and threshold) and registers nothing.
Otherwise the student goes to the Kubeflow Model Registry when `config.registry.kubeflow_address` is set, else
to the local registry folder `registry_uri or config.registry.uri`.
"""
from __future__ import annotations

import getpass
import os
from typing import Optional

from ddil_core.config import Config, resolved_dict

from .gates import GateResult, check_gates, failed
from .lineage import model_source, registration_lineage
from .local import LocalRegistry, RegistryError
from .model_card import current_code_version, redact, render_model_card

__all__ = [
    "GateError",
    "GateResult",
    "KubeflowRegistry",
    "LocalRegistry",
    "RegistryError",
    "check_gates",
    "failed",
    "register_student",
    "render_model_card",
]


class GateError(Exception):
    """The student failed one or more quality gates; `.failed` holds their GateResults."""

    def __init__(self, name: str, failed_results: list[GateResult]):
        self.model_name = name
        self.failed = list(failed_results)
        details = "; ".join(r.message for r in self.failed)
        super().__init__(
            f"refusing to register '{name}': {len(self.failed)} quality gate(s) failed: {details}"
        )


def __getattr__(attr: str):  # KubeflowRegistry without importing it (and its client) eagerly
    if attr == "KubeflowRegistry":
        from .kubeflow_model_registry import KubeflowRegistry

        return KubeflowRegistry
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _author() -> str:
    for var in ("DDIL_AUTHOR", "USER"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "ddil"


def register_student(
    config: Config, student_dir: str, metrics: dict, registry_uri: Optional[str] = None,
    model_uri: Optional[str] = None,
) -> dict:
    """Gate, then register; returns the registry entry. Raises GateError when a gate fails.

    `student_dir`: the student folder (or a remote URI); `model_uri`: where a serving runtime finds the same student
    when that is elsewhere (the KFP artifact's URI; `minio://` is recorded as `s3://`). The version's metadata holds
    the lineage (lineage.py): git SHA, dataset and cache hashes, run ids, DVC lock, s3:// URI."""
    student_dir = os.fspath(student_dir)
    reg = config.registry
    name = reg.model_name
    results = check_gates(metrics, reg.gates)
    bad = failed(results)
    if bad:
        raise GateError(name, bad)

    config_dict = redact(resolved_dict(config))
    data_uri = config.data.dataset
    code = current_code_version()
    gates = [r.to_dict() for r in results]
    lineage = registration_lineage(student_dir, model_uri)
    extra = {"gates": gates, "data_uri": data_uri, "code_version": code}

    if reg.kubeflow_address:
        from .kubeflow_model_registry import KubeflowRegistry

        registry = KubeflowRegistry(reg.kubeflow_address, reg.kubeflow_port, author=_author())

        def kf_card(version: str, uri: str) -> str:
            return render_model_card(name, version, metrics, config_dict, data_uri, code, model_path=uri, gates=gates,
                                     lineage=lineage)

        uri = lineage.get("model_s3_uri") or model_uri
        return registry.register(name, student_dir, metrics, kf_card, extra={**extra, **lineage}, uri=uri,
                                 model_source=model_source(lineage))

    registry = LocalRegistry(registry_uri or reg.uri)

    def card(version: int, path: str) -> str:
        return render_model_card(name, version, metrics, config_dict, data_uri, code, model_path=path, gates=gates,
                                 lineage=lineage)

    return registry.register(name, student_dir, metrics, card, extra={**extra, "lineage": lineage})
