"""Torch thread counts of prepare-demo's loops: a fixed count (demo.threads, bit-reproducible), or the tuner that
keeps them fast on a CPU shared with other processes (demo.adapt_threads)."""
from __future__ import annotations

import contextlib
import logging
import time

import torch

log = logging.getLogger("ddil_core.demo")


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with `n` intra-op threads (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


class ThreadTuner:
    """Keeps a training loop on the faster of two intra-op thread counts: all cores, or one.

    On a CPU shared with other processes, torch's OpenMP threads wait for each other at every parallel region
    whenever one of them is descheduled; two threads then run up to 10x slower than one (measured on the project's
    2-core machines: 0.15 s a teacher step when quiet, ~2 s with two threads and ~0.3 s with one under load).
    The tuner times `probe` steps at one thread (`start`), then up to `probe` at all cores, keeps the faster, then times
    windows of `window` steps, re-timing the other count for up to `probe` steps every `explore_every` windows
    (a probe stops as soon as it has lost; after a lost probe the interval doubles, up to 8x). Thread
    counts change float reduction order, so a tuned run is not bit-identical to an untuned one; `enabled=False`
    keeps the process's setting throughout.
    """

    def __init__(self, enabled: bool = True, window: int = 25, probe: int = 5, explore_every: int = 6,
                 start: int = 1):
        self.max_threads = torch.get_num_threads()
        self.enabled = enabled and self.max_threads > 1
        self.window, self.probe, self.explore_every = window, probe, explore_every
        self.current = self.max_threads
        if self.enabled:
            # Start at one thread by default: a probe of all cores that loses stops after one step, while a first
            # window at all cores on a loaded CPU would cost `probe` slow steps (measured: 5 x 11 s).
            self._set(1 if start < self.max_threads else self.max_threads)
        self.seconds: dict[int, float] = {}  # thread count -> seconds per step in its latest window
        self.switches = 0
        self._steps, self._windows, self._exploring, self._before = 0, 0, False, self.current
        self._since_probe, self._interval = 0, explore_every
        self._t0 = time.perf_counter()

    def _other(self) -> int:
        return 1 if self.current == self.max_threads else self.max_threads

    def _set(self, threads: int) -> None:
        if threads != self.current:
            self.current = threads
            torch.set_num_threads(threads)

    def step(self) -> None:
        """Call once after every training step."""
        if not self.enabled:
            return
        self._steps += 1
        now = time.perf_counter()
        if self._exploring:
            # A probe ends after `probe` steps, or as soon as it has lost: when it has taken longer than `probe`
            # steps at the count it is compared with (one slow step under load must not cost many).
            lost = now - self._t0 > self.probe * self.seconds[self._before]
            if self._steps < self.probe and not lost:
                return
        elif self._steps < (self.probe if not self._windows else self.window):
            return  # the first window is probe-sized: a loaded CPU is noticed (and left) within a few steps
        self.seconds[self.current] = (now - self._t0) / self._steps
        self._steps, self._t0 = 0, now
        if self._exploring:  # keep the faster of the two
            self._exploring = False
            best = min(self.seconds, key=self.seconds.get)
            if best != self._before:
                log.info("threads: %d -> %d (%.3f s vs %.3f s a step; the CPU is %s)", self._before, best,
                         self.seconds[self._before], self.seconds[best],
                         "shared with other work" if best == 1 else "free again")
                self.switches += 1
                self._interval = self.explore_every
            else:  # a lost probe: probe less often (up to 8x), since the conditions seem to last
                self._interval = min(self._interval * 2, 8 * self.explore_every)
            self._set(best)
            return
        self._windows += 1
        self._since_probe += 1
        if self._since_probe >= self._interval or self._windows == 1:
            self._exploring, self._before, self._since_probe = True, self.current, 0
            self._set(self._other())

    def restore(self) -> None:
        torch.set_num_threads(self.max_threads)
        self.current = self.max_threads

    def describe(self) -> dict:
        return {"enabled": self.enabled, "seconds_per_step": {str(k): v for k, v in self.seconds.items()},
                "switches": self.switches, "final": self.current}
