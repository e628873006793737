"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs"), on any features: the unbiased
estimate of the squared MMD with the cubic polynomial kernel k(x, y) = (x . y / d + 1)^3, averaged over disjoint
subsets, with its standard error over them. Unlike the Fréchet distance it has no small-sample bias: its expected
value is 0 for two samples of one distribution at any sample size."""
from __future__ import annotations

import math

import torch


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased squared MMD of x [m, d] and y [n, d] with k(a, b) = (a . b / d + 1)^3 (float64)."""
    x, y = x.double(), y.double()
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = x.shape[0], y.shape[0]
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def kid(x: torch.Tensor, y: torch.Tensor, subset_size: int = 1000, seed: int = 0) -> dict:
    """{"kid", "se", "subsets", "subset_size"}: the mean of polynomial_mmd2 over disjoint random subsets of both
    samples (as many as the smaller sample holds), and its standard error over the subsets (None with one)."""
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {x.shape[0]} and {y.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    px, py = torch.randperm(x.shape[0], generator=g), torch.randperm(y.shape[0], generator=g)
    count = min(x.shape[0], y.shape[0]) // size
    values = [polynomial_mmd2(x[px[i * size:(i + 1) * size]], y[py[i * size:(i + 1) * size]]) for i in range(count)]
    mean = sum(values) / count
    se = (math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1)) / math.sqrt(count)) if count > 1 else None
    return {"kid": mean, "se": se, "subsets": count, "subset_size": size}
