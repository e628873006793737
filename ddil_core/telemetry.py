"""Stage telemetry: Prometheus metrics pushed to a Pushgateway, optionally served on /metrics.

Every stage owns one :class:`StageTelemetry` with its own ``CollectorRegistry`` (never the process-global
one). Metrics are pushed with ``pushadd_to_gateway`` under the grouping key ``{run_id, stage}`` (plus the
``job`` label), at most once per ``push_interval_s`` unless forced, and always when the ``with`` block ends.

Telemetry never fails a run: a failing push (unreachable gateway, DNS error, timeout, HTTP error) or a busy
``serve_port`` is logged once with ``logging.warning`` and ignored afterwards (later failures log at debug).
Credentials are never logged or used as label values: a gateway address such as
``https://user:secret@gw:9091`` is shown as ``https://gw:9091`` and its user/password go to HTTP basic auth.
Basic auth can also come from the environment (``DDIL_PUSHGATEWAY_USERNAME`` / ``DDIL_PUSHGATEWAY_PASSWORD``).

This module imports nothing else from ddil_core; its only dependency is prometheus-client (tqdm is used for
the terminal progress bar when it happens to be installed).

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
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Tuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.exposition import basic_auth_handler, default_handler, pushadd_to_gateway

__all__ = ["StageTelemetry", "progress_iter", "LOSS_SOURCES"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Keys of a per-objective loss dict that name a state source rather than a loss term.
LOSS_SOURCES = frozenset({"all", "forward", "teacher", "student", "mixed"})

#: Seconds a single push may take before it is abandoned.
PUSH_TIMEOUT_S = 2.0
#: Upper bound for the back-off between non-forced pushes after consecutive failures.
MAX_BACKOFF_S = 300.0

_ENV_USER = "DDIL_PUSHGATEWAY_USERNAME"
_ENV_PASSWORD = "DDIL_PUSHGATEWAY_PASSWORD"


def _number(value: Any) -> Optional[float]:
    """``float(value)`` for real numbers (not bools, not None, not strings); else None."""
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _split_credentials(address: str) -> Tuple[str, Optional[str], Optional[str]]:
    """Return (address without userinfo, username, password)."""
    raw = address.strip()
    parsed = urlsplit(raw if "://" in raw else "http://" + raw)
    if parsed.username is None and parsed.password is None:
        return raw, None, None
    host = parsed.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{parsed.port}" if parsed.port else "")
    clean = urlunsplit((parsed.scheme, netloc, parsed.path, parsed.query, parsed.fragment))
    return clean, parsed.username, parsed.password


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
        self.grouping_key = {"run_id": self.run_id, "stage": self.stage}
        self.registry = CollectorRegistry(auto_describe=True)

        self._gateway: Optional[str] = None
        self._gateway_display = ""
        self._username: Optional[str] = None
        self._password: Optional[str] = None
        if pushgateway:
            self._gateway, self._username, self._password = _split_credentials(pushgateway)
            self._gateway_display = self._gateway
            if self._username is None and os.environ.get(_ENV_USER):
                self._username = os.environ.get(_ENV_USER)
                self._password = os.environ.get(_ENV_PASSWORD, "")

        self._last_push: Optional[float] = None  # monotonic time of the last attempt
        self._consecutive_failures = 0
        self._warned: set = set()
        self.pushes_ok = 0
        self.pushes_failed = 0

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

    # ------------------------------------------------------------------ failure policy
    def _warn_once(self, kind: str, message: str, *args: Any) -> None:
        if kind in self._warned:
            logger.debug(message, *args)
        else:
            self._warned.add(kind)
            logger.warning(message, *args)

    def _scrub(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text

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

    # ------------------------------------------------------------------ pushing
    @property
    def pushgateway(self) -> Optional[str]:
        """The gateway address without credentials (None when pushing is disabled)."""
        return self._gateway_display or None

    def _handler(self) -> Callable:
        fixed_timeout = self.push_timeout_s
        user, password = self._username, self._password

        def handler(url: str, method: str, timeout: Optional[float], headers: list, data: bytes) -> Callable:
            t = fixed_timeout if timeout is None else min(timeout, fixed_timeout)
            if user is not None:
                return basic_auth_handler(url, method, t, headers, data, user, password or "")
            return default_handler(url, method, t, headers, data)

        return handler

    def push(self, force: bool = False) -> bool:
        """Push the registry if ``force`` or ``push_interval_s`` elapsed since the last attempt.

        Returns True when a push happened and succeeded. Never raises. After consecutive failures the
        interval for non-forced pushes doubles (up to 5 minutes) so a dead gateway costs little.
        """
        if self._gateway is None:
            return False
        now = time.monotonic()
        if not force and self._last_push is not None:
            interval = self.push_interval_s
            if self._consecutive_failures:
                interval = min(max(interval, 1.0) * 2 ** self._consecutive_failures, max(MAX_BACKOFF_S, interval))
            if now - self._last_push < interval:
                return False
        self._last_push = now
        try:
            pushadd_to_gateway(
                self._gateway,
                job=self.job,
                registry=self.registry,
                grouping_key=self.grouping_key,
                timeout=self.push_timeout_s,
                handler=self._handler(),
            )
        except Exception as exc:  # unreachable, DNS, timeout, HTTP error, anything: never fatal
            self.pushes_failed += 1
            self._consecutive_failures += 1
            self._warn_once(
                "push",
                "telemetry: push to Pushgateway %s failed (%s: %s); metrics of stage %r are not pushed, "
                "the run continues (further failures are logged at debug level)",
                self._gateway_display, type(exc).__name__, self._scrub(str(exc)), self.stage,
            )
            return False
        if self._consecutive_failures:
            logger.debug("telemetry: Pushgateway %s reachable again", self._gateway_display)
        self._consecutive_failures = 0
        self.pushes_ok += 1
        return True

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


# ---------------------------------------------------------------------- progress
def _fmt_duration(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m" if s == 0 or m >= 10 else f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _fmt_rate(rate: float) -> str:
    if rate >= 10:
        return f"{rate:.0f} it/s"
    if rate >= 1:
        return f"{rate:.1f} it/s"
    return f"{rate:.2f} it/s"


def _status_line(desc: str, done: int, total: Optional[int], elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        pct = 100.0 * done / total
        eta = (total - done) / rate if rate > 0 else math.inf
        return f"{desc}: {done}/{total} ({pct:.0f}%), {_fmt_rate(rate)}, eta {_fmt_duration(eta)}"
    return f"{desc}: {done}, {_fmt_rate(rate)}, elapsed {_fmt_duration(elapsed)}"


def _stderr_is_tty() -> bool:
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except Exception:
        return False


try:  # optional: a nicer bar on terminals when tqdm is installed
    from tqdm import tqdm as _tqdm  # type: ignore
except Exception:  # pragma: no cover - depends on the environment
    _tqdm = None


def progress_iter(
    iterable: Iterable[T],
    total: Optional[int],
    desc: str,
    log_every_s: float = 10.0,
    *,
    telemetry: Optional[StageTelemetry] = None,
    log: Optional[logging.Logger] = None,
) -> Iterator[T]:
    """Yield from ``iterable`` while reporting progress.

    On a terminal (``sys.stderr.isatty()``) a single-line bar is drawn (tqdm when installed, else plain
    ``\\r`` updates). Elsewhere (pods, CI, log files) a line like ``desc: 120/500 (24%), 3.1 it/s, eta 2m`` is
    logged at INFO every ``log_every_s`` seconds and once at the end. If ``telemetry`` is given,
    ``telemetry.progress(done, total)`` is called at the same cadence and at the end.
    """
    log = log or logger
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except Exception:
            total = None
    tty = _stderr_is_tty()
    start = time.monotonic()
    last_report = start
    last_draw = 0.0
    done = 0
    bar = None
    if tty and _tqdm is not None:
        bar = _tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)

    def report_telemetry() -> None:
        if telemetry is not None:
            telemetry.progress(done, total if total is not None else 0)

    def draw(final: bool = False) -> None:
        elapsed = time.monotonic() - start
        if total:
            width = 24
            filled = int(width * min(done, total) / total)
            frac = "#" * filled + "-" * (width - filled)
            line = f"\r{desc}: {100.0 * done / total:3.0f}%|{frac}| {_status_line('', done, total, elapsed)[2:]}"
        else:
            line = "\r" + _status_line(desc, done, total, elapsed)
        try:
            sys.stderr.write(line + ("\n" if final else ""))
            sys.stderr.flush()
        except Exception:  # pragma: no cover - a closed stream must not stop the loop
            pass

    completed = False
    try:
        for item in iterable:
            yield item
            done += 1
            now = time.monotonic()
            if bar is not None:
                bar.update(1)
            elif tty:
                if now - last_draw >= 0.1:
                    last_draw = now
                    draw()
            if now - last_report >= log_every_s:
                last_report = now
                if not tty:
                    log.info("%s", _status_line(desc, done, total, now - start))
                report_telemetry()
        completed = True
    finally:
        if bar is not None:
            bar.close()
        elif tty:
            draw(final=True)
        if not tty:
            elapsed = time.monotonic() - start
            line = _status_line(desc, done, total, elapsed)
            if completed:
                log.info("%s, done in %s", line, _fmt_duration(elapsed))
            else:
                log.info("%s, stopped", line)
        report_telemetry()
