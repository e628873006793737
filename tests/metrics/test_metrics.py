"""Metrics and report layer: checked against the reference implementations (prdc, torchmetrics)."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ddil_core.metrics.diversity import mean_pairwise_distance
from ddil_core.metrics.fid import frechet_distance, torchmetrics_fid
from ddil_core.metrics.prdc import precision_recall_density_coverage
from ddil_core.metrics.plots import plot_quality_vs_steps, save_grid
from ddil_core.metrics.report import write_report


# ------------------------------------------------------------------------------------------ PRDC
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [1024, 37])  # 37 < N: several chunks, one ragged
def test_prdc_matches_reference(seed, chunk_size):
    prdc = pytest.importorskip("prdc")
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(200, 16)).astype(np.float32)
    fake = (rng.normal(size=(150, 16)) * 1.2 + 0.3).astype(np.float32)
    ref = prdc.compute_prdc(real, fake, nearest_k=5)
    ours = precision_recall_density_coverage(real, fake, k=5, chunk_size=chunk_size)
    assert set(ours) == {"precision", "recall", "density", "coverage"}
    for key in ours:
        assert ours[key] == pytest.approx(float(ref[key]), abs=1e-9), key
    assert 0 < ours["precision"] < 1 and 0 < ours["coverage"] < 1  # a non-degenerate case


def test_prdc_torch_input_and_k():
    prdc = pytest.importorskip("prdc")
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(120, 8, generator=g), torch.randn(90, 8, generator=g) + 0.5
    ref = prdc.compute_prdc(real.numpy(), fake.numpy(), nearest_k=3)
    ours = precision_recall_density_coverage(real, fake, k=3, chunk_size=16)
    for key in ours:
        assert ours[key] == pytest.approx(float(ref[key]), abs=1e-9), key


# ------------------------------------------------------------------------------------------ FID
def test_frechet_distance_matches_torchmetrics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 32))
    b = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.5
    ours = frechet_distance(torch.from_numpy(a), b)
    ref = torchmetrics_fid(a, b)
    assert ours > 1.0
    assert ours == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_identical_sets_is_zero():
    x = torch.randn(300, 24, generator=torch.Generator().manual_seed(1))
    assert frechet_distance(x, x.clone()) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_gaussian_mean_shift_closed_form():
    # Same covariance (identity), means d apart: FD = ||d||^2, up to sampling error.
    g = torch.Generator().manual_seed(2)
    d = torch.tensor([1.0, -2.0, 0.5, 0.0])
    a = torch.randn(40000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(40000, 4, generator=g, dtype=torch.float64) + d
    assert frechet_distance(a, b) == pytest.approx(float(d.square().sum()), abs=0.03)


# ------------------------------------------------------------------------------------------ diversity
def test_mean_pairwise_distance_hand_computed():
    p1 = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])  # pair distances 5, 4, 3 -> mean 4
    p2 = np.array([[1.0, 1.0], [1.0, 3.0]])  # one pair, distance 2
    assert mean_pairwise_distance([p1, p2]) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        mean_pairwise_distance([torch.zeros(1, 2)])


# ------------------------------------------------------------------------------------------ report
def _img(color, size=(12, 10)):
    return Image.new("RGB", size, color)


def test_save_grid_size_and_tensor_input(tmp_path):
    rows = [[_img((255, 0, 0)), _img((0, 255, 0)), _img((0, 0, 255))], [_img("gray")] * 3]
    path = save_grid(rows, tmp_path / "grid.png", pad=2)
    with Image.open(path) as im:
        assert im.size == (3 * 12 + 4 * 2, 2 * 10 + 3 * 2)
        assert im.getpixel((2, 2)) == (255, 0, 0)
    t = torch.rand(2, 4, 3, 8, 8)  # [prompts, seeds, C, H, W]
    with Image.open(save_grid(t, tmp_path / "g2.png", pad=1)) as im:
        assert im.size == (4 * 8 + 5, 2 * 8 + 3)
    with Image.open(save_grid(t, tmp_path / "g3.png", pad=1, upscale=3)) as im:
        assert im.size == (4 * 24 + 5, 2 * 24 + 3)
    assert not list(tmp_path.glob(".*tmp*"))  # temp names renamed away


def test_write_report_md_html_and_images(tmp_path):
    save_grid([[_img("red")] * 2] * 2, tmp_path / "student.png")
    save_grid([[_img("blue")] * 2] * 2, tmp_path / "teacher.png")
    plot_quality_vs_steps(
        [{"steps": s, "fid": f, "model": m} for m, fs in {"student": [30.0, 22.0, 19.5], "teacher": [80.0, 40.0, 18.0]}.items()
         for s, f in zip([1, 4, 50], fs)] + [{"steps": 8, "fid": float("nan"), "model": "student"}],
        tmp_path / "fid_vs_steps.png")
    metrics = {
        "protocol": {"feature_extractor": "digits-cnn", "k": 5, "seeds": [0, 1], "fid": {"resize": "bilinear"}},
        "models": {
            "student": {"fid": 19.51234, "precision": 0.8, "density": float("nan"), "steps": 4, "guidance_scale": None},
            "teacher": {"fid": 18.0, "recall": 0.7, "steps": 50, "seconds_per_image": 0.0123},
        },
    }
    grids = {"student (4 steps)": "student.png", "teacher (50 steps)": "teacher.png"}
    md, html = write_report(tmp_path, metrics, grids, plot="fid_vs_steps.png", title="Test <report>")
    text, md_text = html.read_text(), md.read_text()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]+)"', text)
    assert len(srcs) == 3
    for src in srcs:
        assert not src.startswith(("/", "file:", "http")) and (tmp_path / src).is_file(), src
    assert "19.51" in text and "—" in text and "Test &lt;report&gt;" in text and "digits-cnn" in text
    assert "student (4 steps)" in md_text and "](student.png)" in md_text and "| 19.51 |" in md_text
    with Image.open(tmp_path / "fid_vs_steps.png") as im:
        assert im.size == (720, 450)
