"""The telemetry of one stage run: which Pushgateway, which /metrics port, which run id (light: no torch, so the
register stage uses it too)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from ddil_core.config import Config
from ddil_core.telemetry.stage import StageTelemetry

log = logging.getLogger(__name__)


def telemetry_settings(config: Config) -> tuple[Optional[str], Optional[int]]:
    """(Pushgateway address, /metrics port): telemetry.pushgateway / telemetry.metrics_port, else the environment
    $DDIL_PUSHGATEWAY / $DDIL_METRICS_PORT (the cluster's ddil-settings ConfigMap sets both in every pod)."""
    t = config.telemetry
    gateway = t.pushgateway or os.environ.get("DDIL_PUSHGATEWAY", "").strip() or None
    port = t.metrics_port
    raw = os.environ.get("DDIL_METRICS_PORT", "").strip()
    if port is None and raw:
        try:
            port = int(raw)
        except ValueError:  # telemetry never fails a run: say what is wrong and serve nothing
            log.warning("DDIL_METRICS_PORT=%r is not a port number: /metrics is not served", raw)
    return gateway, port


def stage_telemetry(config: Config, stage: str, out: Path, serve: bool = False) -> StageTelemetry:
    """Prometheus telemetry of one stage. The run id is telemetry.run_id, else $DDIL_RUN_ID (the KFP components set
    it to the pipeline run's id, so every stage of a run pushes under one id), else the run folder's name."""
    t = config.telemetry
    run_id = t.run_id or os.environ.get("DDIL_RUN_ID") or Path(out).resolve().parent.name or "ddil"
    gateway, port = telemetry_settings(config)
    return StageTelemetry(stage, run_id, gateway, t.push_interval_s, port if serve else None)
