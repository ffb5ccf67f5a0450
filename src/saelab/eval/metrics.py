"""Metric definitions. Each is defined once here and used by the trainer, CLI and tests.

* FVU (fraction of variance unexplained, = normalised MSE): Σ‖x − x̂‖² / Σ‖x − x̄‖².
  Explained variance = 1 − FVU.
* L0: mean number of non-zero latents per row.
* Dead fraction: latents that never fire on the evaluated rows; dense: firing on > 10%.
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
        nz = z != 0
        self.active += float(nz.sum())
        self.fire_counts += nz.sum(0).double().cpu()

    def result(self) -> ReconstructionMetrics:
        if self.rows == 0 or self.sum_x is None:
            raise ValueError("no rows were evaluated")
        total_var = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.rows
        f = self.sq_err / max(total_var, 1e-30)
        freq = self.fire_counts / self.rows
        return ReconstructionMetrics(
            fvu=f,
            explained_variance=1.0 - f,
            mse=self.sq_err / self.rows,
            l0=self.active / self.rows,
            dead_fraction=float((freq == 0).double().mean()),
            dense_fraction=float((freq > DENSE_THRESHOLD).double().mean()),
            rows=self.rows,
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
