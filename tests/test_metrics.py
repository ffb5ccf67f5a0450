"""Metric definitions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.eval.metrics import ReconstructionAccumulator, fvu, mmcs
from saelab.train.init import geometric_median, input_scale


def test_fvu_known_values() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0): total variance 2
    assert fvu(x, x) == 0.0
    assert fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    assert fvu(x, torch.tensor([[1.0, 1.0], [3.0, 0.0]])) == pytest.approx(0.5)


def test_accumulator_over_batches_equals_whole_set() -> None:
    torch.manual_seed(0)
    x = torch.randn(1000, 8) + 3
    recon = x + 0.3 * torch.randn_like(x)
    z = torch.relu(torch.randn(1000, 20) - 1.0)
    z[:, 5] = 0  # never fires
    z[:, 6] = 1  # fires everywhere
    acc = ReconstructionAccumulator(20)
    for i in range(0, 1000, 128):
        acc.add(x[i:i + 128], recon[i:i + 128], z[i:i + 128])
    m = acc.result()
    assert m.fvu == pytest.approx(fvu(x, recon), rel=1e-9)
    assert m.explained_variance == pytest.approx(1 - m.fvu)
    assert m.l0 == pytest.approx(float((z != 0).sum(-1).float().mean()), rel=1e-6)
    assert m.dead_fraction == pytest.approx(1 / 20)
    freq = (z != 0).float().mean(0)
    assert m.dense_fraction == pytest.approx(float((freq > 0.1).float().mean()))
    assert m.rows == 1000


def test_core_metrics_known_values() -> None:
    """cos(x, x̂), ‖x̂‖/‖x‖ and SAEBench's relative reconstruction bias on hand-made cases:
    x̂ = x/2 is perfectly aligned, half the length and shrunk by 2; a rotated x̂ of the right
    length is unbiased in length but not in direction."""
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0], [6.0, 8.0]])
    z = torch.zeros(4, 200_001)
    z[:, 0] = 1.0  # fires on every row: density 1
    z[0, 1] = 1.0  # one row in four: log10 density −0.602
    m = _measure(x, x / 2, z)
    assert m.cossim == pytest.approx(1.0) and m.l2_ratio == pytest.approx(0.5)
    assert m.relative_reconstruction_bias == pytest.approx(0.5)
    assert m.density_log10_mean == pytest.approx((0 + torch.tensor(0.25).log10().item()) / 2)
    assert m.dead_fraction == pytest.approx(199_999 / 200_001)
    rot = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    m = _measure(x, x @ rot, z)  # 90 degrees: orthogonal, same length
    assert m.cossim == pytest.approx(0.0, abs=1e-12) and m.l2_ratio == pytest.approx(1.0)
    assert math.isnan(m.relative_reconstruction_bias)  # E[x̂·x] = 0: no rescaling makes it x
    # ultra-low density: a latent firing once in 200,001 rows (below 1e-5)
    rows = torch.randn(200_001, 2)
    zz = torch.zeros(200_001, 3)
    zz[:, 0], zz[7, 1] = 1.0, 1.0
    m = _measure(rows, rows, zz)
    assert m.ultralow_fraction == pytest.approx(1 / 3) and m.dead_fraction == pytest.approx(1 / 3)
    assert m.relative_reconstruction_bias == pytest.approx(1.0)


def _measure(x: torch.Tensor, recon: torch.Tensor, z: torch.Tensor):
    acc = ReconstructionAccumulator(z.shape[1])
    acc.add(x, recon, z)
    return acc.result()


def test_mmcs() -> None:
    true = torch.eye(4)
    assert mmcs(torch.eye(4) * 3, true) == (1.0, 1.0)
    half = torch.cat([torch.eye(4)[:2], torch.zeros(1, 4)])
    half[2, 2] = half[2, 3] = 1.0  # halfway between features 2 and 3: cos 0.707
    score, recovered = mmcs(half, true)
    assert score == pytest.approx((2 + 2 * 2**-0.5) / 4)
    assert recovered == 0.5


def test_input_scale_and_geometric_median() -> None:
    x = torch.randn(5000, 16) * 7
    c = input_scale(x)
    assert float((c * x).pow(2).sum(-1).mean()) == pytest.approx(16, rel=1e-6)
    pts = torch.zeros(101, 2)
    pts[:50, 0] = 1.0
    pts[100] = torch.tensor([1e6, 1e6])  # one far outlier barely moves the median
    med = geometric_median(pts)
    assert float(med.norm()) < 1.0
