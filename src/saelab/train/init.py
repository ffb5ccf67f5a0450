"""Data-dependent initialisation: the input scale and the decoder bias."""

from __future__ import annotations

import math

from torch import Tensor


def input_scale(sample: Tensor) -> float:
    """The constant c with E‖c·x‖² = d_in on ``sample`` [n, d_in]."""
    mean_sq = float(sample.double().pow(2).sum(-1).mean())
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        return 1.0
    return math.sqrt(sample.shape[1] / mean_sq)


def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to ``points``.

    Robust to outliers, unlike the mean; the decoder bias starts there so latents need
    not explain the data's offset.
    """
    pts = points.double()
    median = pts.mean(0)
    for _ in range(iters):
        dist = (pts - median).norm(dim=1).clamp_min(1e-12)
        w = 1.0 / dist
        new = (w[:, None] * pts).sum(0) / w.sum()
        shift = float((new - median).norm())
        median = new
        if shift <= tol * max(1.0, float(median.norm())):
            break
    return median.to(points.dtype)
