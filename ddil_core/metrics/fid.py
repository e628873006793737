"""Fréchet distance between two feature sets (the FID formula, any feature extractor).

FD = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2})   (Heusel et al. 2017)

Everything is float64: in float32 the trace term loses several digits at 2048 dimensions.
"""
from __future__ import annotations

import numpy as np
import torch

ArrayLike = "torch.Tensor | np.ndarray"


def _as_float64_2d(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    t = t.detach().to("cpu", torch.float64)
    if t.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(t.shape)}")
    if t.shape[0] < 2:
        raise ValueError("at least two samples per set are needed for a covariance")
    return t


def _mean_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = x.mean(dim=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)  # unbiased, as numpy.cov and torchmetrics


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Tr((S1 S2)^{1/2}) without a non-symmetric sqrtm.

    S1 S2 is similar to S1^{1/2} S2 S1^{1/2}, which is symmetric PSD, so its eigenvalues are real and
    non-negative up to rounding: clamping them replaces the "drop tiny imaginary parts" step of sqrtm.
    """
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    inner = (inner + inner.T) / 2  # symmetrize away rounding before eigvalsh
    return float(torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum())


def frechet_distance(real_feats, fake_feats) -> float:
    """Fréchet distance between Gaussians fitted (float64) to two [N, D] feature sets."""
    real, fake = _as_float64_2d(real_feats), _as_float64_2d(fake_feats)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
    mu1, s1 = _mean_cov(real)
    mu2, s2 = _mean_cov(fake)
    fd = float((mu1 - mu2).square().sum()) + float(s1.trace() + s2.trace()) - 2 * trace_sqrt_product(s1, s2)
    return max(fd, 0.0)  # a true distance; tiny negatives are rounding on identical sets


class _GivenFeatures(torch.nn.Module):
    """Identity 'feature extractor': torchmetrics' FID then runs on features we computed ourselves."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of probing with a dummy image

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


def torchmetrics_fid(real_feats, fake_feats) -> float:
    """FID through torchmetrics' FrechetInceptionDistance with an identity feature module.

    torchmetrics 1.9 imports torch-fidelity only behind `_TORCH_FIDELITY_AVAILABLE`, so
    `torchmetrics.image.fid` imports without torchvision and accepts `feature=<nn.Module>`.
    Its states are float64; feeding float64 features makes the returned value float64 too.
    Kept as an independent cross-check of `frechet_distance` (different covariance and sqrt route).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance  # ~5 s cold import: only when asked

    real, fake = _as_float64_2d(real_feats), _as_float64_2d(fake_feats)
    metric = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]))
    metric.set_dtype(torch.float64)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())
