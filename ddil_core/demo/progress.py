"""Progress of long loops as plain log lines, at most one every `every_s` seconds (plus the last step)."""
from __future__ import annotations

import logging
import time
from typing import Optional

log = logging.getLogger("ddil_core.demo")


class Progress:
    def __init__(self, what: str, total: int, every_s: float = 10.0, max_seconds: Optional[float] = None):
        self.what, self.total, self.every_s, self.max_seconds = what, total, every_s, max_seconds
        self.start = self._last = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def over_budget(self) -> bool:
        """True once the wall-clock guard (if any) is exceeded."""
        return self.max_seconds is not None and self.elapsed > self.max_seconds

    def update(self, done: int, **values: float) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s and done < self.total:
            return
        self._last = now
        rate = done / max(self.elapsed, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        extra = "".join(f" {k} {v:.4g}" for k, v in values.items())
        log.info("%s %d/%d%s (%.1f/s, %.0f s elapsed, eta %.0f s)", self.what, done, self.total, extra, rate,
                 self.elapsed, eta)
