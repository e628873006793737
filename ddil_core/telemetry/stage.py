"""Stage telemetry: what a stage reports as Prometheus metrics (pushed by telemetry_push.py, optionally served on
/metrics).

Every stage owns one :class:`StageTelemetry` with its own ``CollectorRegistry`` (never the process-global one),
pushed under the grouping key ``{run_id, stage}`` at most once per ``push_interval_s`` unless forced, and always when
the ``with`` block ends. Telemetry never fails a run: a failing push (telemetry_push.py) or a busy ``serve_port`` is
logged once and ignored afterwards. Progress bars and log lines of long loops are progress.py's.

Metric names (all gauges; grouping labels job, run_id, stage are added by the Pushgateway). A stage exposes a gauge
only once it has set it (cache-latents shows progress, not a buffer size of 0); the checkpoint gauges are NaN until
a checkpoint is written.

================================================  ==========================================================
ddil_train_step                                   last logged optimiser step
ddil_train_step_seconds                           seconds per update over the last logging interval
ddil_loss{objective,term,source}                  loss values of the last logging interval
ddil_source_share{source}                         share of training states from each source (forward, ...)
ddil_buffer_size                                  replay buffer size (states)
ddil_buffer_mean_age_steps                        mean age of buffer entries, in optimiser steps
ddil_samples_per_second                           training throughput
ddil_gpu_memory_bytes                             peak/current accelerator memory as reported by the loop
ddil_nonfinite_skips_total                        running count of skipped non-finite updates (a gauge,
                                                  because it is restored on resume)
ddil_checkpoint_age_seconds                       seconds since the last checkpoint (NaN before the first)
ddil_checkpoint_last_timestamp_seconds            unix time of the last checkpoint (NaN before the first)
ddil_stage_duration_seconds                       wall time of the stage (live while running, final at end)
ddil_stage_success                                1 when the stage finished, 0 when it raised (set at end)
ddil_stage_last_success_timestamp_seconds         unix time of the last successful end (set on success only,
                                                  so with pushadd the Pushgateway keeps the previous value
                                                  of this group when a rerun fails)
ddil_eval_metric{model,metric}                    evaluation results (fid, coverage, ...)
ddil_items_processed_total                        items done by a batch stage (images cached, rollouts made)
ddil_progress_ratio                               done / total of a batch stage, 0..1
================================================  ==========================================================

Loss records: ``record["loss"]`` maps objective -> value, where value is

* a number: ``term="total", source="all"``;
* a dict whose keys are sources (``all``, ``forward``, ``teacher``, ``student``, ``mixed``):
  ``term="total", source=key``; any other key is a loss term: ``term=key, source="all"``;
* a dict of dicts ``{term: {source: value}}``: ``term``, ``source`` as given.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from typing import Any, Iterator, Mapping, Optional, Tuple

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from ddil_core.config.redaction import redact_string
from ddil_core.telemetry.push import PUSH_TIMEOUT_S, GatewayPusher, WarnOnce

__all__ = ["StageTelemetry", "LOSS_SOURCES"]

logger = logging.getLogger("ddil_core.telemetry")  # one logger for the package (push.py logs to it too)

#: Keys of a per-objective loss dict that name a state source rather than a loss term.
LOSS_SOURCES = frozenset({"all", "forward", "teacher", "student", "mixed"})



def _number(value: Any) -> Optional[float]:
    """``float(value)`` for real numbers (not bools, not None, not strings); else None."""
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


class StageTelemetry:
    """Prometheus metrics of one pipeline stage of one run.

    Use as a context manager around the stage body; it records the duration and success and pushes at the
    end whether the body succeeded or raised (the exception is never swallowed)::

        with StageTelemetry("distill", run_id, pushgateway=url, serve_port=9100 if rank == 0 else None) as tel:
            for step in ...:
                tel.log_train(step, record)      # pushes at most every push_interval_s
            tel.checkpoint_written()

    ``pushgateway=None`` disables pushing; ``serve_port`` (decided by the caller, e.g. rank 0 only) serves
    ``/metrics`` from this registry (``0`` picks a free port, see :attr:`serve_port`).
    """

    def __init__(
        self,
        stage: str,
        run_id: str,
        pushgateway: Optional[str],
        push_interval_s: float = 15.0,
        serve_port: Optional[int] = None,
        job: str = "ddil",
        *,
        serve_addr: str = "0.0.0.0",
        push_timeout_s: float = PUSH_TIMEOUT_S,
    ) -> None:
        self.stage = str(stage)
        self.run_id = str(run_id)
        self.job = str(job)
        self.push_interval_s = float(push_interval_s)
        self.push_timeout_s = float(push_timeout_s)
        self.grouping_key = {"run_id": redact_string(self.run_id), "stage": self.stage}  # labels: no secret
        self.registry = CollectorRegistry(auto_describe=True)

        self._warn_once = WarnOnce()
        self._pusher = GatewayPusher(pushgateway, self.job, self.grouping_key, self.stage, self.push_interval_s,
                                     self.push_timeout_s, self._warn_once)

        self._t_start: Optional[float] = None
        self._t_end: Optional[float] = None
        self._last_checkpoint: Optional[float] = None  # unix time

        r = self.registry
        self.train_step = Gauge("ddil_train_step", "Last logged optimiser step.", registry=None)
        self.train_step_seconds = Gauge(
            "ddil_train_step_seconds", "Seconds per optimiser update over the last logging interval.", registry=None
        )
        self.loss = Gauge(
            "ddil_loss", "Training loss of the last logging interval.", ["objective", "term", "source"], registry=r
        )
        self.source_share = Gauge(
            "ddil_source_share", "Share of training states drawn from each source.", ["source"], registry=r
        )
        self.buffer_size = Gauge("ddil_buffer_size", "Replay buffer size in states.", registry=None)
        self.buffer_mean_age = Gauge(
            "ddil_buffer_mean_age_steps", "Mean age of replay buffer entries in optimiser steps.", registry=None
        )
        self.samples_per_second = Gauge("ddil_samples_per_second", "Training samples per second.", registry=None)
        self.gpu_memory = Gauge("ddil_gpu_memory_bytes", "Accelerator memory in use, bytes.", registry=None)
        self.nonfinite_skips = Gauge(
            "ddil_nonfinite_skips_total",
            "Running count of updates skipped for non-finite loss or gradients (restored on resume).",
            registry=None,
        )
        self.checkpoint_age = Gauge(
            "ddil_checkpoint_age_seconds", "Seconds since the last checkpoint was written (NaN before).", registry=r
        )
        self.checkpoint_age.set_function(self._checkpoint_age)
        self.checkpoint_timestamp = Gauge(
            "ddil_checkpoint_last_timestamp_seconds",
            "Unix time of the last checkpoint written (NaN before).",
            registry=r,
        )
        self.checkpoint_timestamp.set_function(
            lambda: self._last_checkpoint if self._last_checkpoint is not None else math.nan
        )
        self.stage_duration = Gauge(
            "ddil_stage_duration_seconds", "Wall time of the stage (live while it runs).", registry=r
        )
        self.stage_duration.set_function(self._duration)
        self.eval_metric = Gauge(
            "ddil_eval_metric", "Evaluation result of a model.", ["model", "metric"], registry=r
        )
        self.items_processed = Gauge(
            "ddil_items_processed_total", "Items processed by a batch stage (images cached, rollouts made).",
            registry=None,
        )
        self.train_eval = Gauge("ddil_train_eval", "In-training measure of the student against the teacher "
                                "(training.eval_every; training/watch.py): drift, kid, shift_factor, adherence, and "
                                "degraded (1 while the alarm's threshold is passed).", ["measure"], registry=None)
        self.progress_ratio = Gauge("ddil_progress_ratio", "Fraction of the stage's items done, 0 to 1.", registry=None)
        # The gauges above without labels are registered when first set (`_use`), so a stage exposes only what it
        # reports (no zeros for a buffer that cache-latents never had). Registered only when the stage ends, so a
        # running stage does not report success 0:
        self.stage_success = Gauge("ddil_stage_success", "1 if the stage succeeded, 0 if it failed.", registry=None)
        self.stage_last_success = Gauge(
            "ddil_stage_last_success_timestamp_seconds", "Unix time of the last successful end of the stage.",
            registry=None,
        )
        self._registered: set = set()

        self._httpd = None
        self._http_thread = None
        self.serve_port: Optional[int] = None
        if serve_port is not None:
            self._serve(int(serve_port), serve_addr)

    # ------------------------------------------------------------------ /metrics server
    def _serve(self, port: int, addr: str) -> None:
        try:
            result = start_http_server(port, addr=addr, registry=self.registry)
        except Exception as exc:  # port in use, permission, bad address: never fatal
            self._warn_once(
                "serve",
                "telemetry: cannot serve /metrics on %s:%s (%s: %s); continuing without it",
                addr, port, type(exc).__name__, exc,
            )
            return
        if isinstance(result, tuple):  # prometheus-client >= 0.20 returns (server, thread)
            self._httpd, self._http_thread = result
            self.serve_port = int(self._httpd.server_port)
        else:  # pragma: no cover - older clients
            self.serve_port = port
        logger.info("telemetry: serving /metrics on %s:%s", addr, self.serve_port)

    def close(self) -> None:
        """Stop the /metrics server, if one was started (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            try:
                httpd.shutdown()
                httpd.server_close()
            except Exception as exc:  # pragma: no cover
                logger.debug("telemetry: closing /metrics server failed: %s", exc)

    # ------------------------------------------------------------------ derived values
    def _checkpoint_age(self) -> float:
        if self._last_checkpoint is None:
            return math.nan
        return max(0.0, time.time() - self._last_checkpoint)

    def _duration(self) -> float:
        if self._t_start is None:
            return 0.0
        end = self._t_end if self._t_end is not None else time.monotonic()
        return end - self._t_start

    # ------------------------------------------------------------------ updates
    def log_train(self, step: int, record: Mapping[str, Any]) -> None:
        """Update the training gauges from one train-log record, then push if the interval elapsed.

        Any key may be missing; malformed entries are skipped.
        """
        try:
            self._log_train(step, record or {})
        except Exception as exc:
            self._warn_once("record", "telemetry: could not read a train-log record (%s: %s); skipped",
                            type(exc).__name__, exc)
        self.push()

    def _log_train(self, step: int, record: Mapping[str, Any]) -> None:
        s = _number(step)
        if s is None:
            s = _number(record.get("step"))
        if s is not None:
            self._use(self.train_step).set(s)
        for key, gauge in (
            ("seconds_per_update", self.train_step_seconds),
            ("samples_per_second", self.samples_per_second),
            ("gpu_memory_bytes", self.gpu_memory),
            ("nonfinite_skips", self.nonfinite_skips),
        ):
            v = _number(record.get(key))
            if v is not None:
                self._use(gauge).set(v)

        watched = record.get("eval")
        if isinstance(watched, Mapping):
            for measure, value in watched.items():
                v = _number(float(value) if isinstance(value, bool) else value)
                if v is not None:
                    self._use(self.train_eval).labels(measure=str(measure)).set(v)
        losses = record.get("loss")
        if isinstance(losses, Mapping):
            for objective, entry in losses.items():
                for term, source, value in self._loss_entries(entry):
                    self.loss.labels(objective=str(objective), term=term, source=source).set(value)
        else:
            v = _number(losses)
            if v is not None:
                self.loss.labels(objective="total", term="total", source="all").set(v)

        shares = record.get("source_share")
        if isinstance(shares, Mapping):
            for source, value in shares.items():
                v = _number(value)
                if v is not None:
                    self.source_share.labels(source=str(source)).set(v)

        buf = record.get("buffer")
        if isinstance(buf, Mapping):
            v = _number(buf.get("size"))
            if v is not None:
                self._use(self.buffer_size).set(v)
            age = buf.get("mean_age", buf.get("mean_age_steps"))
            v = _number(age)
            if v is not None:
                self._use(self.buffer_mean_age).set(v)

    @staticmethod
    def _loss_entries(entry: Any) -> Iterator[Tuple[str, str, float]]:
        v = _number(entry)
        if v is not None:
            yield "total", "all", v
            return
        if not isinstance(entry, Mapping):
            return
        for key, value in entry.items():
            key = str(key)
            if isinstance(value, Mapping):  # {term: {source: value}}
                for source, inner in value.items():
                    iv = _number(inner)
                    if iv is not None:
                        yield key, str(source), iv
                continue
            v = _number(value)
            if v is None:
                continue
            if key in LOSS_SOURCES:
                yield "total", key, v
            else:
                yield key, "all", v

    def checkpoint_written(self, timestamp: Optional[float] = None) -> None:
        """Record that a checkpoint was just written (or at unix time ``timestamp``), then push if due."""
        self._last_checkpoint = time.time() if timestamp is None else float(timestamp)
        self.push()

    def progress(self, done: int, total: int) -> None:
        """Batch-stage progress: ``done`` items of ``total``; pushes if the interval elapsed."""
        try:
            d = _number(done)
            t = _number(total)
            if d is not None:
                self._use(self.items_processed).set(d)
                if t is not None and t > 0:
                    self._use(self.progress_ratio).set(min(max(d / t, 0.0), 1.0))
        except Exception as exc:  # pragma: no cover - defensive
            self._warn_once("record", "telemetry: bad progress values (%s); skipped", exc)
        self.push()

    def eval_results(self, metrics: Mapping[str, Any]) -> None:
        """Evaluation results ``{"models": {name: {metric: number, ...}, ...}}``; non-numbers are skipped."""
        try:
            models = (metrics or {}).get("models") or {}
            if isinstance(models, Mapping):
                for model, values in models.items():
                    if not isinstance(values, Mapping):
                        continue
                    for metric, value in values.items():
                        v = _number(value)
                        if v is not None:
                            self.eval_metric.labels(model=str(model), metric=str(metric)).set(v)
        except Exception as exc:
            self._warn_once("record", "telemetry: could not read evaluation metrics (%s: %s); skipped",
                            type(exc).__name__, exc)
        self.push()

    # ------------------------------------------------------------------ pushing (telemetry_push.py)
    @property
    def pushgateway(self) -> Optional[str]:
        """The gateway address without credentials (None when pushing is disabled)."""
        return self._pusher.address

    @property
    def pushes_ok(self) -> int:
        return self._pusher.pushes_ok

    @property
    def pushes_failed(self) -> int:
        return self._pusher.pushes_failed

    def push(self, force: bool = False) -> bool:
        """Push the registry if ``force`` or ``push_interval_s`` elapsed since the last attempt; True when a push
        happened and succeeded. Never raises."""
        return self._pusher.push(self.registry, force)

    # ------------------------------------------------------------------ stage lifecycle
    def _use(self, gauge: Gauge) -> Gauge:
        """The gauge, registered in this stage's registry the first time it is used."""
        if id(gauge) not in self._registered:
            self.registry.register(gauge)
            self._registered.add(id(gauge))
        return gauge

    def _register_end_metric(self, gauge: Gauge) -> None:
        self._use(gauge)

    def start(self) -> "StageTelemetry":
        """Mark the stage start (``__enter__`` calls it)."""
        self._t_start = time.monotonic()
        self._t_end = None
        return self

    def finish(self, success: bool) -> None:
        """Record the stage end with ``success``, push (forced) and stop the /metrics server. Never raises."""
        try:
            if self._t_start is None:
                self._t_start = time.monotonic()
            self._t_end = time.monotonic()
            self.stage_success.set(1.0 if success else 0.0)
            self._register_end_metric(self.stage_success)
            if success:
                self.stage_last_success.set(time.time())
                self._register_end_metric(self.stage_last_success)
        except Exception as exc:  # pragma: no cover - defensive
            logger.debug("telemetry: recording the stage end failed: %s", exc)
        self.push(force=True)
        self.close()

    def __enter__(self) -> "StageTelemetry":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.finish(success=exc_type is None)
        return False  # never swallow the stage's exception
