"""Kernel Inception Distance on precomputed features: the unbiased estimate of the squared maximum mean discrepancy
with the cubic polynomial kernel k(x, y) = (x . y / d + 1)^3 (Binkowski, Sutherland, Arbel, Gretton, "Demystifying
MMD GANs", ICLR 2018, eq. 4 and section 4), the kernel torchmetrics' KernelInceptionDistance and the paper's code use.

    KID = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j)

Unbiased, so it can be slightly negative when the two sets come from the same distribution; it needs no covariance,
so a few dozen samples give a usable value (what the in-training watch measures: training/watch.py). `kid_with_se`
averages it over disjoint subsets and gives its standard error (the evidence benchmark). Pure tensors.
"""
from __future__ import annotations

import math

import torch


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef: float = 1.0) -> torch.Tensor:
    """(x y^T / d + coef)^degree for rows of x [m, d] and y [n, d]."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def kid(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased KID between feature sets x [m, d] and y [n, d] (m, n >= 2), in float64."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    if x.shape[0] < 2 or y.shape[0] < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"kid: needs two sets of at least two rows of the same width, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = (polynomial_kernel(a, b, degree, coef) for a, b in ((x, x), (y, y), (x, y)))
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def standardiser(reference: torch.Tensor):
    """A function taking features [n, d] to units of `reference`'s per-dimension mean and spread. The cubic kernel
    assumes entries of order one, as Inception features have: on raw classifier features (x . y / d ~ 16 for the
    digits) the kernel is ~5,000 and KID is noise (standard error ~10 between two samples of one distribution);
    standardised by the reference, ~0.001."""
    mean, spread = reference.mean(0), reference.std(0).clamp_min(1e-8)
    return lambda features: (features - mean) / spread


def kid_with_se(x: torch.Tensor, y: torch.Tensor, subset_size: int = 1000, seed: int = 0) -> dict:
    """{"kid", "se", "subsets", "subset_size"}: the mean of `kid` over disjoint random subsets of both sets (as many
    as the smaller one holds), and its standard error over the subsets (None with one)."""
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"kid: needs at least 2 rows on each side, got {x.shape[0]} and {y.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    px, py = torch.randperm(x.shape[0], generator=g), torch.randperm(y.shape[0], generator=g)
    count = min(x.shape[0], y.shape[0]) // size
    values = [kid(x[px[i * size:(i + 1) * size]], y[py[i * size:(i + 1) * size]]) for i in range(count)]
    mean = sum(values) / count
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1) / count) if count > 1 else None
    return {"kid": mean, "se": se, "subsets": count, "subset_size": size}
