"""Observability of real runs: a tiny distill and a tiny evaluate push their metrics to a REAL Pushgateway under the
grouping key {run_id, stage}; distill serves /metrics while it trains; a dead gateway never fails a run."""
from __future__ import annotations

import logging
import urllib.request

import pytest

from ddil_core.stages.distill import distill
from tests.conftest import tiny_config
from tests.fakes.pushgateway import free_port, metric_value, pushgateway, read_metrics  # noqa: F401

RUN_ID = "test-run"
SOURCES = ("forward", "teacher", "student")


@pytest.fixture(scope="module")
def pushed(tiny_data, pushgateway, tmp_path_factory):  # noqa: F811
    """One distill and one evaluate of run `test-run` pushed to the gateway; distill also serves /metrics, which is
    scraped from inside the run (the on_log hook) at step 3."""
    from ddil_core.stages.evaluate import evaluate

    latents, rollouts = tiny_data["sd15"]
    root = tmp_path_factory.mktemp("observed")
    port = free_port()
    telemetry = (f"telemetry.pushgateway={pushgateway}", f"telemetry.run_id={RUN_ID}", "telemetry.push_interval_s=0",
                 f"telemetry.metrics_port={port}")
    config = tiny_config("sd15", *telemetry)
    scraped = {}

    def scrape(record):
        if record["step"] == 3:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                scraped["text"] = resp.read().decode()
            scraped["step"] = record["step"]

    student = distill(config, latents, [rollouts], root / "run", on_log=scrape)
    after_distill = read_metrics(pushgateway)
    eval_config = tiny_config("sd15", *telemetry, "evaluation.extractor=pixels", "evaluation.num_reference=64",
                              "evaluation.teacher_steps=4", "evaluation.num_prompts=2")
    metrics = evaluate(eval_config, student, "tiny://sd15", root / "eval")
    return {"distill": after_distill, "all": read_metrics(pushgateway), "scraped": scraped, "port": port,
            "metrics": metrics, "root": root}


def _key(stage):
    return {"job": "ddil", "run_id": RUN_ID, "stage": stage}


def test_distill_metrics_reach_the_gateway_with_run_id_and_stage(pushed):
    text = pushed["all"]
    key = _key("distill")
    assert metric_value(text, "ddil_train_step", **key) == 6  # the tiny recipe's last step
    assert metric_value(text, "ddil_stage_success", **key) == 1
    losses = {s: metric_value(text, "ddil_loss", objective="pd", term="total", source=s, **key) for s in SOURCES}
    assert any(v is not None for v in losses.values()), [line for line in text.splitlines() if "ddil_loss" in line]
    assert all(v >= 0 for v in losses.values() if v is not None)
    shares = {s: metric_value(text, "ddil_source_share", source=s, **key) for s in SOURCES}
    assert None not in shares.values() and sum(shares.values()) == pytest.approx(1.0)
    assert metric_value(text, "ddil_train_step_seconds", **key) > 0
    assert metric_value(text, "ddil_buffer_size", **key) is not None
    assert metric_value(text, "ddil_checkpoint_last_timestamp_seconds", **key) > 0
    assert metric_value(text, "ddil_stage_duration_seconds", **key) > 0
    # (metric_value matched the grouping labels job, run_id and stage on each of these samples)


def test_evaluate_metrics_reach_the_gateway(pushed):
    text = pushed["all"]
    key = _key("evaluate")
    student = pushed["metrics"]["models"]["student"]
    assert metric_value(text, "ddil_eval_metric", model="student", metric="fid", **key) == pytest.approx(student["fid"])
    assert metric_value(text, "ddil_eval_metric", model="teacher", metric="fid", **key) is not None
    assert metric_value(text, "ddil_stage_success", **key) == 1
    # a separate group: evaluate's push did not replace distill's metrics
    assert metric_value(text, "ddil_train_step", **_key("distill")) == 6
    assert metric_value(pushed["distill"], "ddil_eval_metric", model="student", metric="fid", **key) is None


def test_distill_serves_metrics_while_it_trains(pushed):
    scraped = pushed["scraped"]
    assert scraped.get("step") == 3, "the /metrics scrape inside the run did not happen"
    assert metric_value(scraped["text"], "ddil_train_step") == 3
    assert metric_value(scraped["text"], "ddil_source_share", source="forward") is not None
    assert metric_value(scraped["text"], "ddil_stage_success") is None  # only set when the stage ends
    with pytest.raises(OSError):  # the server stops with the stage
        urllib.request.urlopen(f"http://127.0.0.1:{pushed['port']}/metrics", timeout=2)


def test_a_dead_gateway_never_fails_the_run(tiny_data, tmp_path, caplog):
    latents, rollouts = tiny_data["sd15"]
    dead = f"http://127.0.0.1:{free_port()}"  # a closed port: connection refused
    config = tiny_config("sd15", f"telemetry.pushgateway={dead}", "telemetry.run_id=test-run-dead",
                         "telemetry.push_interval_s=0")
    with caplog.at_level(logging.WARNING, logger="ddil_core.telemetry"):
        student = distill(config, latents, [rollouts], tmp_path / "run")
    assert (student / "model_index.json").exists()
    warnings = [r.getMessage() for r in caplog.records if r.name == "ddil_core.telemetry"]
    assert len(warnings) == 1 and dead in warnings[0] and "the run continues" in warnings[0]
