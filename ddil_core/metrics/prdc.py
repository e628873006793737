"""Precision, recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics
for Generative Models").

Follows the reference implementation clovaai/generative-evaluation-prdc, file prdc/prdc.py (compute_prdc),
with the same definitions and strict '<' comparisons, but computed in float64 and in row chunks, so that
memory is O(chunk_size x max(N, M)) instead of the reference's full N x M distance matrices.
"""
from __future__ import annotations

import numpy as np
import torch


def _as_float64_2d(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.detach().to("cpu", torch.float64)
    if t.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(t.shape)}")
    return t


def _euclidean(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] euclidean distances (the |a|^2 + |b|^2 - 2ab expansion, as sklearn does)."""
    d2 = a.square().sum(1, keepdim=True) + b_sq[None, :] - 2.0 * (a @ b.T)
    return d2.clamp_min_(0).sqrt_()


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def nearest_neighbour_radii(feats: torch.Tensor, k: int, chunk_size: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set, the point itself excluded.

    As the reference: the (k+1)-th smallest distance of a row that includes the point's zero self-distance.
    """
    n = feats.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} points, got {n}")
    sq = feats.square().sum(1)
    radii = torch.empty(n, dtype=torch.float64)
    for lo, hi in _chunks(n, chunk_size):
        d = _euclidean(feats[lo:hi], feats, sq)
        d[torch.arange(hi - lo), torch.arange(lo, hi)] = 0.0  # exact self-distance (the expansion leaves ~1e-8)
        radii[lo:hi] = torch.topk(d, k + 1, dim=1, largest=False).values[:, -1]
    return radii


def precision_recall_density_coverage(real, fake, k: int = 5, chunk_size: int = 1024) -> dict[str, float]:
    """PRDC of `fake` against `real` ([N, D] and [M, D], torch or numpy), k-NN balls of radius k-th NN.

    precision: share of fakes inside at least one real ball.    recall: share of reals inside a fake ball.
    density:   mean number of real balls holding a fake, / k.   coverage: share of real balls holding a fake.
    """
    real, fake = _as_float64_2d(real), _as_float64_2d(fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    real_radii = nearest_neighbour_radii(real, k, chunk_size)
    fake_radii = nearest_neighbour_radii(fake, k, chunk_size)

    # One pass over real-row chunks of the real x fake distances gives all four statistics:
    # per-fake counts of real balls (precision, density) and per-real flags (recall, coverage).
    fake_sq = fake.square().sum(1)
    balls_per_fake = torch.zeros(fake.shape[0], dtype=torch.int64)
    real_in_fake_ball = torch.zeros(real.shape[0], dtype=torch.bool)
    real_ball_covered = torch.zeros(real.shape[0], dtype=torch.bool)
    for lo, hi in _chunks(real.shape[0], chunk_size):
        d = _euclidean(real[lo:hi], fake, fake_sq)
        balls_per_fake += (d < real_radii[lo:hi, None]).sum(0)
        real_in_fake_ball[lo:hi] = (d < fake_radii[None, :]).any(1)
        real_ball_covered[lo:hi] = d.min(1).values < real_radii[lo:hi]

    return {
        "precision": float((balls_per_fake > 0).double().mean()),
        "recall": float(real_in_fake_ball.double().mean()),
        "density": float(balls_per_fake.double().mean() / k),
        "coverage": float(real_ball_covered.double().mean()),
    }
