"""ddil_core.progress, the one progress implementation of every long loop: tqdm's bar on a terminal, plain log lines
(rate, ETA, the loss where there is one) elsewhere, the stage's telemetry gauges at every update."""
from __future__ import annotations

import io
import logging
import sys
import uuid

import pytest

from ddil_core.progress import Progress, progress_iter
from ddil_core.telemetry.stage import StageTelemetry

LOGGER = "ddil_core.progress"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_off_a_terminal_every_update_logs_a_line_when_the_interval_is_zero(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger=LOGGER)
    tel = StageTelemetry("cache-latents", uuid.uuid4().hex, None)
    assert list(progress_iter(range(6), 6, "cache-latents", unit="image", every_s=0, telemetry=tel)) == list(range(6))
    lines = _lines(caplog)
    assert [line.split(" (")[0] for line in lines] == [f"cache-latents: image {i}/6" for i in range(1, 7)]
    assert all(", eta " in line and ("image/s" in line or "s/image" in line) for line in lines), lines
    assert sys.stderr.getvalue() == ""  # no bar drawn off a terminal
    assert tel.registry.get_sample_value("ddil_items_processed_total") == 6
    assert tel.registry.get_sample_value("ddil_progress_ratio") == 1.0


def test_between_intervals_only_the_final_line_and_the_loss_is_shown(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger=LOGGER)
    with Progress("distill", 100, unit="step", initial=40, every_s=3600) as progress:  # a resumed run
        for step in range(41, 101):
            progress.note(loss=1.0 / step)
            progress.update_to(step)
    lines = _lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("distill: step 100/100 (100%), ") and lines[0].endswith(
        "loss 0.01"), lines


def test_the_interval_comes_from_the_environment(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv("DDIL_PROGRESS_EVERY_S", "0")
    caplog.set_level(logging.INFO, logger=LOGGER)
    list(progress_iter(range(3), 3, "x"))
    assert len(_lines(caplog)) == 3


@pytest.mark.parametrize("enabled", [True, False])
def test_on_a_terminal_a_bar_is_drawn_with_rate_and_eta(monkeypatch, caplog, enabled):
    fake = _Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    caplog.set_level(logging.INFO, logger=LOGGER)
    with Progress("distill", 4, unit="step", enabled=enabled) as progress:  # enabled=False: ranks other than 0
        for step in range(1, 5):
            progress.note(loss=0.5)
            progress.update_to(step)
    text = fake.getvalue()
    if enabled:
        assert "distill" in text and "100%" in text and "4/4" in text and "\r" in text and "loss 0.5" in text
        assert "step/s" in text or "s/step" in text
    else:
        assert text == ""
    assert not _lines(caplog)  # a bar, not log lines
