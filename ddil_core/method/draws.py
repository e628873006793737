"""Per-sample random draws of an objective's loss, the same whatever the number of processes.

A training step's global batch is split across ranks (ddil_core/training/loop.py) and each rank computes the loss on
its slice. A draw made per sample inside the loss (LCM's guidance scale w, DMD2's timesteps and noise) is therefore
made for the whole global batch, from the generator every rank holds in the same state, and each rank keeps its own
rows: the generators stay in step, sample i gets the same draw on 1 or 8 processes, and no two ranks share a draw
(drawing only a slice's worth would hand every rank the same numbers for its rows).
"""
from __future__ import annotations

import torch


class SampleDraws:
    def __init__(self, generator: torch.Generator, start: int, stop: int, total: int):
        """Rows [start, stop) of a global batch of `total` samples."""
        if not 0 <= start <= stop <= total:
            raise ValueError(f"rows [{start}, {stop}) are not inside a batch of {total}")
        self.generator, self.start, self.stop, self.total = generator, start, stop, total

    @classmethod
    def whole(cls, generator: torch.Generator, n: int) -> "SampleDraws":
        """All n samples: one process."""
        return cls(generator, 0, n, n)

    def rand(self) -> torch.Tensor:
        """[n] uniform in [0, 1)."""
        return torch.rand(self.total, generator=self.generator)[self.start:self.stop]

    def randn(self, *shape: int) -> torch.Tensor:
        """[n, *shape] standard normal."""
        return torch.randn(self.total, *shape, generator=self.generator)[self.start:self.stop]

    def randint(self, low: int, high: int) -> torch.Tensor:
        """[n] integers in [low, high)."""
        return torch.randint(low, high, (self.total,), generator=self.generator)[self.start:self.stop]
