"""The statistics of the evidence benchmark: KID against torchmetrics' own implementation, and the paired
comparison (t-interval, exact sign-flip p, Holm, detectable effect) on cases worked by hand or by scipy."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from ddil_core.metrics.kid import kid, kid_with_se, standardiser
from ddil_core.metrics.paired import holm, paired, sign_flip_p


def test_kid_equals_torchmetrics_poly_mmd():
    from torchmetrics.image.kid import poly_mmd

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=g, dtype=torch.float64), torch.randn(50, 8, generator=g, dtype=torch.float64)
    assert kid(x, y + 0.3) == pytest.approx(float(poly_mmd(x, y + 0.3)), rel=1e-10)


def test_kid_in_standardised_features_sees_what_raw_features_drown():
    """Features of order 4 per entry (x . y / d ~ 16, as the digit classifier's): the cubic kernel is ~5,000 and two
    samples of one distribution differ by KID values far larger than a real shift does in standardised units."""
    g = torch.Generator().manual_seed(0)
    reference = 4 + torch.randn(400, 32, generator=g)
    same, shifted = 4 + torch.randn(400, 32, generator=g), 4.3 + torch.randn(400, 32, generator=g)
    standardise = standardiser(reference)
    z = standardise(reference)
    assert z.mean(0).abs().max() < 1e-5 and (z.std(0) - 1).abs().max() < 1e-5
    raw_noise = kid_with_se(same, reference, subset_size=100)
    scaled_noise = kid_with_se(standardise(same), z, subset_size=100)
    scaled_shift = kid_with_se(standardise(shifted), z, subset_size=100)
    assert scaled_shift["kid"] > 3 * scaled_noise["se"]
    assert raw_noise["se"] > 100 * scaled_noise["se"]


def test_kid_is_unbiased_where_frechet_distance_is_not():
    """Two samples of one distribution: KID averages to 0 at a small sample size; a shift makes it clearly positive."""
    from ddil_core.metrics.fid import frechet_distance

    g = torch.Generator().manual_seed(1)
    kids, fds = [], []
    for _ in range(20):
        a, b = torch.randn(100, 16, generator=g), torch.randn(100, 16, generator=g)
        kids.append(kid_with_se(a, b, subset_size=50)["kid"])
        fds.append(frechet_distance(a, b))
    assert abs(np.mean(kids)) < 3 * np.std(kids) / math.sqrt(len(kids))
    assert np.mean(fds) > 10 * np.std(fds) / math.sqrt(len(fds))  # the Fréchet distance's small-sample bias
    shifted = kid_with_se(torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g) + 0.5, subset_size=50)
    assert shifted["kid"] > 3 * shifted["se"] and shifted["subsets"] == 4


def test_paired_interval_and_sign_flip_p():
    treatment, control = [3.0, 5.0, 4.0, 6.0], [1.0, 2.0, 2.0, 3.0]
    result = paired(treatment, control)
    d = np.array(treatment) - np.array(control)
    ref = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert result["mean_difference"] == pytest.approx(d.mean())
    assert result["ci95"] == pytest.approx([ref.low, ref.high])
    assert result["p_sign_flip"] == pytest.approx(2 / 16)  # every difference positive: 2 of 16 sign patterns
    assert sign_flip_p([1.0, -1.0]) == 1.0
    assert result["detectable_effect"] > 0
    with pytest.raises(ValueError, match="same seeds"):
        paired([1.0], [1.0, 2.0])


def test_holm_adjusts_step_down_and_stays_monotone():
    adjusted = holm({"pd": 0.01, "lcm": 0.04, "dmd2": 0.03})
    assert adjusted == pytest.approx({"pd": 0.03, "dmd2": 0.06, "lcm": 0.06})
