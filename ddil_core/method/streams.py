"""The random streams of a training run: which generator each kind of draw comes from.

With one stream (training.random_streams = one) every draw comes from the same generator, in the order the mixture
and the objective make them. With separate streams each kind has its own generator, so two runs that differ only in
their state sources (a baseline and its DDIL arm, the same training.seed) still draw the same batch indices, forward
timesteps and noise, and the same loss draws: common random numbers, so the arms differ only where they must.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

KINDS = ("data", "source", "rollout", "loss")


@dataclass
class RandomStreams:
    data: torch.Generator  # batch indices, forward timesteps, forward noise, the teacher pairs of a regression loss
    source: torch.Generator  # which source each sample comes from
    rollout: torch.Generator  # teacher-rollout picks, the student's step count j, the buffer, rollout noise, controls
    loss: torch.Generator  # the objective's per-sample draws (method/draws.py)

    @classmethod
    def single(cls, generator: torch.Generator) -> "RandomStreams":
        return cls(generator, generator, generator, generator)

    @classmethod
    def separate(cls, seed: int) -> "RandomStreams":
        """Four generators from one seed, each seeded by a hash of (seed, kind): seed + i would make the streams of
        seed s and s + 1 overlap, and the CPU generator keeps only 32 bits of a seed, so offsets of 2^32 collide."""
        return cls(*(torch.Generator().manual_seed(_stream_seed(seed, kind)) for kind in KINDS))

    @classmethod
    def of(cls, generator) -> "RandomStreams":
        """A RandomStreams as it is, a plain generator as one stream."""
        return generator if isinstance(generator, RandomStreams) else cls.single(generator)

    @property
    def is_single(self) -> bool:
        return all(getattr(self, kind) is self.data for kind in KINDS)

    def get_state(self) -> dict:
        """{kind: state} of the streams beyond the first (data): none when there is one stream."""
        return {} if self.is_single else {kind: getattr(self, kind).get_state() for kind in KINDS[1:]}

    def set_state(self, state: dict) -> None:
        """Restore what get_state gave (the data stream is restored on its own, as the one generator of old runs)."""
        for kind, value in state.items():
            getattr(self, kind).set_state(value)


def _stream_seed(seed: int, kind: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{int(seed)}/{kind}".encode()).digest()[:4], "little")
