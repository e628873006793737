"""Delivering a stage's Prometheus registry to a Pushgateway (what telemetry.py measures is pushed from here).

`pushadd_to_gateway` under the grouping key `{run_id, stage}` (plus the `job` label), at most once per
`push_interval_s` unless forced; after consecutive failures the interval doubles (up to MAX_BACKOFF_S), so a dead
gateway costs little. A push never raises: a failure is logged once with `logging.warning` (later ones at debug).
Credentials are never logged: `https://user:secret@gw:9091` is shown as `https://gw:9091`, its user/password go to
HTTP basic auth; basic auth can also come from `$DDIL_PUSHGATEWAY_USERNAME` / `$DDIL_PUSHGATEWAY_PASSWORD`.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import basic_auth_handler, default_handler, pushadd_to_gateway

logger = logging.getLogger("ddil_core.telemetry")

#: Seconds a single push may take before it is abandoned.
PUSH_TIMEOUT_S = 2.0
#: Upper bound for the back-off between non-forced pushes after consecutive failures.
MAX_BACKOFF_S = 300.0

ENV_USER = "DDIL_PUSHGATEWAY_USERNAME"
ENV_PASSWORD = "DDIL_PUSHGATEWAY_PASSWORD"


def split_credentials(address: str) -> Tuple[str, Optional[str], Optional[str]]:
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


class WarnOnce:
    """logging.warning the first time for each kind of problem, debug afterwards: telemetry never floods a log."""

    def __init__(self):
        self.warned: set = set()

    def __call__(self, kind: str, message: str, *args: Any) -> None:
        if kind in self.warned:
            logger.debug(message, *args)
        else:
            self.warned.add(kind)
            logger.warning(message, *args)


class GatewayPusher:
    """Pushes one registry to one Pushgateway (or nowhere when `address` is None)."""

    def __init__(self, address: Optional[str], job: str, grouping_key: dict, stage: str, interval_s: float,
                 timeout_s: float = PUSH_TIMEOUT_S, warn: Optional[WarnOnce] = None):
        self.job, self.grouping_key, self.stage = job, grouping_key, stage
        self.interval_s, self.timeout_s = float(interval_s), float(timeout_s)
        self.warn = warn or WarnOnce()
        self.address: Optional[str] = None
        self._username: Optional[str] = None
        self._password: Optional[str] = None
        if address:
            self.address, self._username, self._password = split_credentials(address)
            if self._username is None and os.environ.get(ENV_USER):
                self._username = os.environ.get(ENV_USER)
                self._password = os.environ.get(ENV_PASSWORD, "")
        self._last_push: Optional[float] = None  # monotonic time of the last attempt
        self._consecutive_failures = 0
        self.pushes_ok = 0
        self.pushes_failed = 0

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    def _handler(self) -> Callable:
        fixed_timeout = self.timeout_s
        user, password = self._username, self._password

        def handler(url: str, method: str, timeout: Optional[float], headers: list, data: bytes) -> Callable:
            t = fixed_timeout if timeout is None else min(timeout, fixed_timeout)
            if user is not None:
                return basic_auth_handler(url, method, t, headers, data, user, password or "")
            return default_handler(url, method, t, headers, data)

        return handler

    def push(self, registry: CollectorRegistry, force: bool = False) -> bool:
        """Push if `force` or the interval elapsed since the last attempt; True when a push happened and succeeded."""
        if self.address is None:
            return False
        now = time.monotonic()
        if not force and self._last_push is not None:
            interval = self.interval_s
            if self._consecutive_failures:
                interval = min(max(interval, 1.0) * 2 ** self._consecutive_failures, max(MAX_BACKOFF_S, interval))
            if now - self._last_push < interval:
                return False
        self._last_push = now
        try:
            pushadd_to_gateway(self.address, job=self.job, registry=registry, grouping_key=self.grouping_key,
                               timeout=self.timeout_s, handler=self._handler())
        except Exception as exc:  # unreachable, DNS, timeout, HTTP error, anything: never fatal
            self.pushes_failed += 1
            self._consecutive_failures += 1
            self.warn(
                "push",
                "telemetry: push to Pushgateway %s failed (%s: %s); metrics of stage %r are not pushed, "
                "the run continues (further failures are logged at debug level)",
                self.address, type(exc).__name__, self._scrub(str(exc)), self.stage,
            )
            return False
        if self._consecutive_failures:
            logger.debug("telemetry: Pushgateway %s reachable again", self.address)
        self._consecutive_failures = 0
        self.pushes_ok += 1
        return True
