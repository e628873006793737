"""ddil_core.telemetry against a real Prometheus Pushgateway (tests/fakes/pushgateway.py)."""

from __future__ import annotations

import logging
import math
import socket
import time
import urllib.request
import uuid

import pytest

from ddil_core.telemetry.stage import StageTelemetry
from tests.fakes.pushgateway import free_port, metric_value, pushgateway, read_metrics  # noqa: F401

LOGGER = "ddil_core.telemetry"

RECORD = {
    "step": 10,
    "seconds_per_update": 0.2,
    "samples_per_second": 40.0,
    "loss": {
        "pd": {"all": 0.1, "forward": 0.09, "teacher": 0.12, "student": 0.11},
        "lcm": 0.5,
        "dmd2": {"generator": 1.5, "fake_score": {"all": 0.7}},
    },
    "source_share": {"forward": 0.5, "teacher": 0.25, "student": 0.25},
    "buffer": {"size": 100, "mean_age": 3.2},
    "nonfinite_skips": 2,
    "gpu_memory_bytes": 1234,
}


def _run_id() -> str:
    return "t-" + uuid.uuid4().hex[:10]


def test_train_and_eval_metrics_reach_the_gateway(pushgateway):  # noqa: F811
    run_id = _run_id()
    key = {"job": "ddil", "run_id": run_id, "stage": "distill"}
    with StageTelemetry("distill", run_id, pushgateway, push_interval_s=3600) as tel:
        tel.log_train(10, RECORD)  # first push happens at once
        during = read_metrics(pushgateway)
        assert metric_value(during, "ddil_train_step", **key) == 10
        # the end-of-stage metrics are not there while the stage runs
        assert metric_value(during, "ddil_stage_success", **key) is None
        tel.checkpoint_written()
        tel.eval_results({"models": {"student": {"fid": 12.5, "coverage": 0.8, "note": "x", "gate": None},
                                     "teacher": {"fid": 3.0}}, "prompts": 7})
        assert tel.push() is False  # throttled: interval not elapsed

    text = read_metrics(pushgateway)
    expect = {
        ("ddil_train_step", ()): 10,
        ("ddil_train_step_seconds", ()): 0.2,
        ("ddil_samples_per_second", ()): 40.0,
        ("ddil_buffer_size", ()): 100,
        ("ddil_buffer_mean_age_steps", ()): 3.2,
        ("ddil_nonfinite_skips_total", ()): 2,
        ("ddil_gpu_memory_bytes", ()): 1234,
        ("ddil_loss", (("objective", "pd"), ("term", "total"), ("source", "all"))): 0.1,
        ("ddil_loss", (("objective", "pd"), ("term", "total"), ("source", "teacher"))): 0.12,
        ("ddil_loss", (("objective", "lcm"), ("term", "total"), ("source", "all"))): 0.5,
        ("ddil_loss", (("objective", "dmd2"), ("term", "generator"), ("source", "all"))): 1.5,
        ("ddil_loss", (("objective", "dmd2"), ("term", "fake_score"), ("source", "all"))): 0.7,
        ("ddil_source_share", (("source", "forward"),)): 0.5,
        ("ddil_source_share", (("source", "student"),)): 0.25,
        ("ddil_eval_metric", (("model", "student"), ("metric", "fid"))): 12.5,
        ("ddil_eval_metric", (("model", "student"), ("metric", "coverage"))): 0.8,
        ("ddil_eval_metric", (("model", "teacher"), ("metric", "fid"))): 3.0,
        ("ddil_stage_success", ()): 1,
    }
    for (name, labels), value in expect.items():
        got = metric_value(text, name, **key, **dict(labels))
        assert got == pytest.approx(value), (name, labels, got)
    # non-numeric eval values are skipped
    assert metric_value(text, "ddil_eval_metric", model="student", metric="note", **key) is None
    assert metric_value(text, "ddil_eval_metric", model="student", metric="gate", **key) is None
    assert 0 <= metric_value(text, "ddil_checkpoint_age_seconds", **key) < 60
    assert metric_value(text, "ddil_stage_duration_seconds", **key) > 0
    assert metric_value(text, "ddil_stage_last_success_timestamp_seconds", **key) == pytest.approx(time.time(), abs=60)
    # grouping labels are on every pushed ddil sample
    assert f'run_id="{run_id}"' in text and 'stage="distill"' in text


def test_batch_progress_pushed(pushgateway):  # noqa: F811
    run_id = _run_id()
    with StageTelemetry("cache-latents", run_id, pushgateway, push_interval_s=3600) as tel:
        tel.progress(120, 500)
    key = {"run_id": run_id, "stage": "cache-latents"}
    text = read_metrics(pushgateway)
    assert metric_value(text, "ddil_items_processed_total", **key) == 120
    assert metric_value(text, "ddil_progress_ratio", **key) == pytest.approx(0.24)


def test_failed_stage_still_pushes_success_zero(pushgateway):  # noqa: F811
    run_id = _run_id()
    with pytest.raises(RuntimeError, match="boom"):
        with StageTelemetry("teacher-rollouts", run_id, pushgateway, push_interval_s=3600) as tel:
            tel.progress(3, 10)
            raise RuntimeError("boom")
    key = {"run_id": run_id, "stage": "teacher-rollouts"}
    text = read_metrics(pushgateway)
    assert metric_value(text, "ddil_stage_success", **key) == 0
    assert metric_value(text, "ddil_stage_last_success_timestamp_seconds", **key) is None
    assert metric_value(text, "ddil_items_processed_total", **key) == 3


def test_push_throttle_and_force(pushgateway):  # noqa: F811
    tel = StageTelemetry("evaluate", _run_id(), pushgateway, push_interval_s=3600)
    assert tel.push() is True
    assert tel.push() is False
    assert tel.push(force=True) is True
    assert tel.pushes_ok == 2 and tel.pushes_failed == 0


def test_unreachable_gateway_warns_once_and_never_raises(caplog):
    port = free_port()  # nothing listens there: connection refused
    address = f"http://ddil-user:s3cret-value@127.0.0.1:{port}"
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with pytest.raises(ValueError):
        with StageTelemetry("distill", _run_id(), address, push_interval_s=0) as tel:
            for step in range(3):
                tel.log_train(step, RECORD)
            tel.checkpoint_written()
            tel.progress(1, 2)
            tel.eval_results({"models": {"student": {"fid": 1.0}}})
            assert tel.push(force=True) is False
            raise ValueError("stage error is not swallowed")
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert f"127.0.0.1:{port}" in message
    assert tel.pushes_failed >= 3 and tel.pushes_ok == 0  # first, forced, end (others backed off)
    # credentials never reach the logs
    assert "s3cret-value" not in caplog.text and "ddil-user" not in caplog.text


def test_no_gateway_is_a_no_op():
    with StageTelemetry("register", _run_id(), None) as tel:
        tel.log_train(1, {})
        assert tel.push(force=True) is False
    assert tel.registry.get_sample_value("ddil_stage_success") == 1


def test_serve_port_exposes_metrics():
    port = free_port()
    tel = StageTelemetry("distill", _run_id(), None, serve_port=port, serve_addr="127.0.0.1")
    try:
        assert tel.serve_port == port
        tel.log_train(5, {"loss": {"pd": 0.25}, "buffer": {"size": 7}})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert metric_value(body, "ddil_train_step") == 5
        assert metric_value(body, "ddil_buffer_size") == 7
        assert metric_value(body, "ddil_loss", objective="pd", term="total", source="all") == 0.25
        # only ddil metrics of this registry (no process/python collectors of the global registry)
        assert "python_gc" not in body and "process_cpu" not in body
    finally:
        tel.close()


def test_serve_port_in_use_warns_once(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        tel = StageTelemetry("distill", _run_id(), None, serve_port=port, serve_addr="127.0.0.1")
        tel.log_train(1, RECORD)
        tel.close()
    assert tel.serve_port is None
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(port) in warnings[0].getMessage()


def test_own_registry_and_odd_records():
    from prometheus_client import REGISTRY

    tel = StageTelemetry("distill", _run_id(), None)
    assert tel.registry is not REGISTRY
    assert REGISTRY.get_sample_value("ddil_train_step") is None
    assert math.isnan(tel.registry.get_sample_value("ddil_checkpoint_age_seconds"))
    # malformed pieces are skipped, never raised
    tel.log_train(3, {"loss": {"pd": "nan?", "x": None, "lcm": {"all": [1]}}, "buffer": 5, "source_share": None,
                      "seconds_per_update": "fast", "nonfinite_skips": True})
    tel.log_train(4, None)  # type: ignore[arg-type]
    assert tel.registry.get_sample_value("ddil_train_step") == 4
    tel.checkpoint_written(timestamp=time.time() - 100)
    assert tel.registry.get_sample_value("ddil_checkpoint_age_seconds") == pytest.approx(100, abs=5)
    tel.progress(5, 0)
    assert tel.registry.get_sample_value("ddil_items_processed_total") == 5


def test_address_forms_and_credentials_in_url(pushgateway):  # noqa: F811
    hostport = pushgateway.split("://", 1)[1]
    run_id = _run_id()
    for address in (hostport, f"http://someone:pw-123@{hostport}/"):
        tel = StageTelemetry("evaluate", run_id, address)
        assert "pw-123" not in (tel.pushgateway or "")
        tel.eval_results({"models": {"student": {"fid": 4.0}}})
        assert tel.pushes_ok == 1, address
    assert metric_value(pushgateway, "ddil_eval_metric", run_id=run_id, model="student", metric="fid") == 4.0


def test_push_timeout_is_short(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        tel = StageTelemetry("distill", _run_id(), "127.0.0.1:%d" % silent.getsockname()[1], push_timeout_s=0.3)
        t0 = time.monotonic()
        assert tel.push(force=True) is False
        assert time.monotonic() - t0 < 2.0
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_a_stage_exposes_only_the_gauges_it_sets():
    """A batch stage reports progress, not a zero train step or buffer size it never had; distill the reverse."""
    batch = StageTelemetry("cache-latents", _run_id(), None)
    batch.progress(5, 10)
    assert batch.registry.get_sample_value("ddil_items_processed_total") == 5
    assert batch.registry.get_sample_value("ddil_progress_ratio") == 0.5
    for name in ("ddil_train_step", "ddil_buffer_size", "ddil_samples_per_second", "ddil_nonfinite_skips_total"):
        assert batch.registry.get_sample_value(name) is None, name
    train = StageTelemetry("distill", _run_id(), None)
    train.log_train(3, {"buffer": {"size": 7, "mean_age": 1.5}, "samples_per_second": 2.0})
    assert train.registry.get_sample_value("ddil_train_step") == 3
    assert train.registry.get_sample_value("ddil_buffer_size") == 7
    assert train.registry.get_sample_value("ddil_items_processed_total") is None
    assert train.registry.get_sample_value("ddil_gpu_memory_bytes") is None  # no accelerator reported


def test_stage_telemetry_honours_the_cluster_settings_in_the_environment(pushgateway,  # noqa: F811
                                                                         monkeypatch, tmp_path):
    """$DDIL_PUSHGATEWAY, $DDIL_METRICS_PORT and $DDIL_RUN_ID (the ddil-settings ConfigMap and the KFP components
    set them) take effect when the config leaves telemetry.* unset; the config wins when it sets them."""
    from ddil_core.config import Config
    from ddil_core.stages.common import stage_telemetry

    run_id, port = _run_id(), free_port()
    monkeypatch.setenv("DDIL_PUSHGATEWAY", pushgateway)
    monkeypatch.setenv("DDIL_METRICS_PORT", str(port))
    monkeypatch.setenv("DDIL_RUN_ID", run_id)
    with stage_telemetry(Config(), "distill", tmp_path / "folder-name-is-not-the-run" / "distill", serve=True) as tel:
        tel.log_train(3, {"loss": {"pd": 0.5}})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert metric_value(resp.read().decode(), "ddil_train_step") == 3
    assert metric_value(pushgateway, "ddil_stage_success", run_id=run_id, stage="distill") == 1

    config = Config()
    config.telemetry.pushgateway, config.telemetry.run_id = None, "from-config"
    tel = stage_telemetry(config, "evaluate", tmp_path / "x")
    assert tel.pushgateway == pushgateway  # from the environment: the config left it unset
    assert tel.run_id == "from-config" and tel.serve_port is None  # serve=False: no port
    monkeypatch.setenv("DDIL_METRICS_PORT", "nine-thousand")
    from ddil_core.telemetry.settings import telemetry_settings

    assert telemetry_settings(Config())[1] is None  # a bad value serves nothing (telemetry never fails a run)


def test_the_in_training_measure_reaches_the_gateway(pushgateway):  # noqa: F811
    """A watched run's eval line (training/watch.py) becomes ddil_train_eval{measure=...} at the real gateway."""
    run_id = _run_id()
    key = {"job": "ddil", "run_id": run_id, "stage": "distill"}
    with StageTelemetry("distill", run_id, pushgateway, push_interval_s=0) as tel:
        tel.log_train(4, {"step": 4, "eval": {"drift": 0.25, "kid": 0.01, "shift_factor": None, "degraded": True,
                                              "student_steps": 2}})
    text = read_metrics(pushgateway)
    assert metric_value(text, "ddil_train_eval", measure="drift", **key) == pytest.approx(0.25)
    assert metric_value(text, "ddil_train_eval", measure="kid", **key) == pytest.approx(0.01)
    assert metric_value(text, "ddil_train_eval", measure="degraded", **key) == 1
    assert metric_value(text, "ddil_train_eval", measure="shift_factor", **key) is None
