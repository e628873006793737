"""Per-sample random draws of an objective's loss, the same whatever the number of processes.

A training step's global batch is split across ranks (ddil_core/training/loop.py) and each rank computes the loss on
its slice. A draw made per sample inside the loss (LCM's guidance scale w, DMD2's timesteps and noise) is therefore
made for the whole global batch, from the generator every rank holds in the same state, and each rank keeps its own
rows: the generators stay in step, sample i gets the same draw on 1 or 8 processes, and no two ranks share a draw
(drawing only a slice's worth would hand every rank the same numbers for its rows).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


class SampleDraws:
    def __init__(self, generator: torch.Generator, start: int, stop: int, total: int, shared: Optional[list] = None):
        """Rows [start, stop) of a global batch of `total` samples. `shared`: one list for all the micro-batches of a
        global batch (gradient accumulation): the i-th draw of every micro-batch's loss is then the same global draw
        (made once, by the first micro-batch), so accumulating gives the draws, and the update, of one big batch."""
        if not 0 <= start <= stop <= total:
            raise ValueError(f"rows [{start}, {stop}) are not inside a batch of {total}")
        self.generator, self.start, self.stop, self.total = generator, start, stop, total
        self._shared, self._calls = shared, 0

    def _global(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self._shared is None:
            return make()
        if self._calls == len(self._shared):
            self._shared.append((key, make()))
        seen, value = self._shared[self._calls]
        if seen != key:
            raise RuntimeError(f"micro-batch draw {self._calls} is {key}, the first micro-batch drew {seen}")
        self._calls += 1
        return value

    @classmethod
    def whole(cls, generator: torch.Generator, n: int) -> "SampleDraws":
        """All n samples: one process."""
        return cls(generator, 0, n, n)

    def rand(self) -> torch.Tensor:
        """[n] uniform in [0, 1)."""
        return self._global(("rand",), lambda: torch.rand(self.total, generator=self.generator))[self.start:self.stop]

    def randn(self, *shape: int) -> torch.Tensor:
        """[n, *shape] standard normal."""
        return self._global(("randn", *shape), lambda: torch.randn(self.total, *shape, generator=self.generator)
                            )[self.start:self.stop]

    def randint(self, low: int, high: int) -> torch.Tensor:
        """[n] integers in [low, high)."""
        return self._global(("randint", low, high), lambda: torch.randint(low, high, (self.total,),
                                                                           generator=self.generator))[self.start:self.stop]
