"""Metric definitions. Each is defined once here and used by the trainer, CLI and tests.

* FVU (fraction of variance unexplained, = normalised MSE): Σ‖x − x̂‖² / Σ‖x − x̄‖².
  Explained variance = 1 − FVU.
* L0: mean number of non-zero latents per row.
* Dead fraction: latents that never fire on the evaluated rows; dense: firing on > 10%.
* Cosine similarity: mean over rows of cos(x, x̂). L2 ratio: mean over rows of ‖x̂‖ / ‖x‖.
* Relative reconstruction bias (SAEBench, after Wright & Sharkey 2024): γ = E[x̂·x̂] / E[x̂·x],
  the factor by which x̂ would have to be divided to be the best rescaling toward x; 1 is
  unbiased, below 1 is shrinkage (as an L1 penalty causes).
* Feature density: the fraction of rows on which a latent fires; reported as the mean and
  median of log10 density over the latents that fire, and the fraction of latents that fire
  but on fewer than 1e-5 of the rows (ultra-low density).
* MMCS: mean over ground-truth features of the max cosine similarity with any decoder
  row; recovered fraction: features whose best match has cos > 0.9.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from saelab.sae.base import fvu  # noqa: F401  (the one definition, shared with the trainer's log)

DENSE_THRESHOLD = 0.1
ULTRALOW_DENSITY = 1e-5
RECOVERED_COS = 0.9


def mmcs(decoder: Tensor, true_features: Tensor) -> tuple[float, float]:
    """(MMCS, fraction recovered at cos > 0.9) of decoder rows [n, d] vs features [m, d]."""
    dec = torch.nn.functional.normalize(decoder.detach().double(), dim=1)
    true = torch.nn.functional.normalize(true_features.detach().double(), dim=1)
    best = (true @ dec.T).max(dim=1).values
    return float(best.mean()), float((best > RECOVERED_COS).double().mean())


@dataclass
class ReconstructionMetrics:
    fvu: float
    explained_variance: float
    mse: float  # mean over rows of ‖x − x̂‖²
    l0: float
    dead_fraction: float
    dense_fraction: float
    rows: int
    cossim: float = float("nan")
    l2_ratio: float = float("nan")
    relative_reconstruction_bias: float = float("nan")
    density_log10_mean: float = float("nan")  # over the latents that fire
    density_log10_median: float = float("nan")
    ultralow_fraction: float = float("nan")

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class ReconstructionAccumulator:
    """Streams batches of (x, x̂, latents) and yields :class:`ReconstructionMetrics`.

    Sums are kept in float64 so the FVU over many batches equals the FVU of the whole set.
    """

    def __init__(self, n_latents: int) -> None:
        self.n_latents = n_latents
        self.rows = 0
        self.sq_err = 0.0
        self.sum_x: Tensor | None = None
        self.sum_sq = 0.0
        self.active = 0.0
        self.fire_counts = torch.zeros(n_latents, dtype=torch.float64)
        self.cos_sum = 0.0
        self.ratio_sum = 0.0
        self.rr = 0.0  # Σ x̂·x̂
        self.rx = 0.0  # Σ x̂·x

    @torch.no_grad()
    def add(self, x: Tensor, recon: Tensor, latents: Tensor) -> None:
        x64 = x.reshape(-1, x.shape[-1]).double()
        r64 = recon.reshape(-1, x.shape[-1]).double()
        z = latents.reshape(-1, latents.shape[-1])
        self.rows += x64.shape[0]
        self.sq_err += float((x64 - r64).pow(2).sum())
        sx = x64.sum(0).cpu()
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        self.sum_sq += float(x64.pow(2).sum())
        x_norm, r_norm = x64.norm(dim=-1), r64.norm(dim=-1)
        dot = (x64 * r64).sum(-1)
        self.cos_sum += float((dot / (x_norm * r_norm).clamp_min(1e-30)).sum())
        self.ratio_sum += float((r_norm / x_norm.clamp_min(1e-30)).sum())
        self.rr += float(r_norm.pow(2).sum())
        self.rx += float(dot.sum())
        nz = z != 0
        self.active += float(nz.sum())
        self.fire_counts += nz.sum(0).double().cpu()

    def result(self) -> ReconstructionMetrics:
        if self.rows == 0 or self.sum_x is None:
            raise ValueError("no rows were evaluated")
        total_var = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.rows
        f = self.sq_err / max(total_var, 1e-30)
        freq = self.fire_counts / self.rows
        alive = freq[freq > 0]
        log_density = alive.log10() if alive.numel() else torch.full((1,), float("nan"), dtype=torch.float64)
        return ReconstructionMetrics(
            fvu=f,
            explained_variance=1.0 - f,
            mse=self.sq_err / self.rows,
            l0=self.active / self.rows,
            dead_fraction=float((freq == 0).double().mean()),
            dense_fraction=float((freq > DENSE_THRESHOLD).double().mean()),
            rows=self.rows,
            cossim=self.cos_sum / self.rows,
            l2_ratio=self.ratio_sum / self.rows,
            relative_reconstruction_bias=self.rr / self.rx if self.rx != 0 else float("nan"),
            density_log10_mean=float(log_density.mean()),
            density_log10_median=float(log_density.median()),
            ultralow_fraction=float(((freq > 0) & (freq < ULTRALOW_DENSITY)).double().mean()),
        )


@torch.no_grad()
def evaluate_reconstruction(sae: torch.nn.Module, batches: Iterable[Tensor]) -> ReconstructionMetrics:
    """Run ``sae`` over ``batches`` of raw activations and measure it."""
    acc = ReconstructionAccumulator(sae.n_latents)  # type: ignore[attr-defined]
    device = sae.W_dec.device  # type: ignore[attr-defined]
    dtype = sae.W_dec.dtype  # type: ignore[attr-defined]
    for batch in batches:
        x, y = batch if isinstance(batch, tuple) else (batch, batch)  # a transcoder's (input, target)
        x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
        z = sae.encode(x)  # type: ignore[attr-defined]
        recon = sae.decode(z)  # type: ignore[attr-defined]
        skip = sae.skip_term(x) if hasattr(sae, "skip_term") else None
        acc.add(y, recon if skip is None else recon + skip, z)
    return acc.result()
