"""Progress of every long loop (prepare-demo's training and sampling, cache-latents, teacher-rollouts, distill,
evaluate), one implementation on tqdm:

- on a terminal (stderr is a TTY) a tqdm bar with rate and ETA (and the loss where there is one);
- elsewhere (pods, CI, `dvc repro` into a log, a pipe) a plain log line about every 10 s and one at the end, such as
  `distill: step 120/600 (20%), 3.10step/s, elapsed 00:38, eta 02:35, loss 0.0123`, written by tqdm's own
  formatter into the `ddil_core.progress` logger (INFO), so the rate and ETA are computed the same way in both.

The interval of the plain lines is `every_s` (default 10 s, or `$DDIL_PROGRESS_EVERY_S`: 0 prints every update).
Given a StageTelemetry, every update also sets its progress gauges (which push at their own interval). Progress never
touches a random generator or a tensor, so it cannot change what a loop computes.
"""
from __future__ import annotations

import io
import logging
import math
import os
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)
T = TypeVar("T")

EVERY_S_ENV = "DDIL_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 10.0
# tqdm's own fields (tqdm.format_meter): rate_fmt is "3.10step/s", or "4.95s/step" below one a second.
PLAIN_FORMAT = "{desc}: {unit} {n_fmt}/{total_fmt} ({percentage:.0f}%), {rate_fmt}, elapsed {elapsed}, eta {remaining}" \
               "{postfix}"
PLAIN_FORMAT_NO_TOTAL = "{desc}: {unit} {n_fmt}, {rate_fmt}, elapsed {elapsed}{postfix}"


def default_every_s() -> float:
    raw = os.environ.get(EVERY_S_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_EVERY_S
    except ValueError:
        log.warning("%s=%r is not a number of seconds: progress lines every %g s", EVERY_S_ENV, raw, DEFAULT_EVERY_S)
        return DEFAULT_EVERY_S
    return value if math.isfinite(value) and value >= 0 else DEFAULT_EVERY_S


def stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except Exception:  # a closed or replaced stream
        return False


class _LogLines(io.TextIOBase):
    """What tqdm writes ("\\rline", padding, a final "\\n"), turned into log records, one per distinct line."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger, self.last, self.muted = logger, None, False

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line and line != self.last and not self.muted:
            self.last = line
            self.logger.info("%s", line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class Progress:
    """Progress of one loop of `total` items (None: unknown), starting at `initial` (a resumed run)::

        with Progress("distill", total=600, unit="step", initial=step) as progress:
            for ...:
                progress.update_to(step)          # or progress.update(1)
                progress.note(loss=0.0123)        # shown after the rate and ETA

    `enabled=False` (e.g. ranks other than 0) shows nothing; `telemetry` gets `progress(done, total)` at every update.
    """

    def __init__(self, desc: str, total: Optional[int], unit: str = "it", initial: int = 0,
                 every_s: Optional[float] = None, telemetry=None, enabled: bool = True,
                 logger: Optional[logging.Logger] = None):
        self.desc, self.total, self.telemetry = desc, total, telemetry
        self.tty = stderr_is_tty()
        self.started = time.monotonic()
        common = dict(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, leave=True)
        if self.tty:
            self.bar = tqdm(file=sys.stderr, dynamic_ncols=True, **common)
        else:
            every = default_every_s() if every_s is None else float(every_s)
            # miniters=1: the time is checked at every update, so a loop whose first steps are slow still reports
            # on time; smoothing 0: the rate (and so the ETA) is the average since the start, steady in a log.
            lines = _LogLines(logger or log)
            lines.muted = True  # not the "0/N, ?/s" line tqdm prints when it starts
            self.bar = tqdm(file=lines, mininterval=every, miniters=1, smoothing=0,
                            bar_format=PLAIN_FORMAT if total else PLAIN_FORMAT_NO_TOTAL, **common)
            lines.muted = False

    @property
    def n(self) -> int:
        return int(self.bar.n)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self._telemetry()

    def update_to(self, done: int) -> None:
        """Set the count of items done (a loop that knows its step)."""
        if done != self.bar.n:
            self.bar.update(done - self.bar.n)
        self._telemetry()

    def note(self, **values) -> None:
        """Values shown after the rate and ETA from the next line on, e.g. loss=0.0123 (call it before update)."""
        self.bar.set_postfix_str(", ".join(f"{k} {_short(v)}" for k, v in values.items()), refresh=False)

    def _telemetry(self) -> None:
        if self.telemetry is not None:
            self.telemetry.progress(self.n, self.total or 0)

    def close(self) -> None:
        """The finished bar (terminal), or the final line unless the last one already showed the final count."""
        if not self.tty and getattr(self.bar, "last_print_n", None) == self.bar.n:
            self.bar.leave = False  # tqdm would print the same count again with a new elapsed time
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress_iter(iterable: Iterable[T], total: Optional[int], desc: str, unit: str = "it",
                  every_s: Optional[float] = None, *, telemetry=None) -> Iterator[T]:
    """Yield from `iterable`, counting one item per element, with a Progress (see the module docstring)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(desc, total, unit, every_s=every_s, telemetry=telemetry) as progress:
        for item in iterable:
            yield item
            progress.update(1)
