"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025; Nabeshima 2024):
the dictionary is cut into nested prefixes — the first g₁ latents, the first g₁ + g₂, … up to
all of them — and every prefix must reconstruct the input on its own:

    L = Σᵢ ‖x − x̂₍ᵢ₎‖² + α·AuxK,    x̂₍ᵢ₎ = b_dec + Σ_{latents j in prefix i} z_j W_dec,j

with z chosen by BatchTopK over the whole dictionary. The early latents cannot lean on the
later ones, so a general feature keeps a latent of its own instead of being absorbed into its
more specific children, and the dictionary does not split it. At inference it is a BatchTopK
SAE (one learned threshold), saved as JumpReLU as SAELens does.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from saelab.sae.base import Codes, TrainContext, squared_error
from saelab.sae.batchtopk import BatchTopKConfig, BatchTopKSAE


class MatryoshkaConfig(BatchTopKConfig):
    """Matryoshka BatchTopK: nested prefixes of the dictionary each reconstruct the input."""

    architecture: Literal["matryoshka"] = "matryoshka"
    group_sizes: list[int] | None = Field(
        default=None, min_length=1,
        description="Latents in each nested group, first to last, summing to n_latents, e.g. "
        "128,256,512,1152 [default: `groups` groups, each twice the one before].",
    )
    groups: int = Field(default=5, ge=1, le=32, description="Number of groups when group_sizes is unset.")

    def check(self, d_in: int, n_latents: int) -> None:
        super().check(d_in, n_latents)
        if self.group_sizes is not None:
            if any(g <= 0 for g in self.group_sizes):
                raise ValueError(f"group_sizes {self.group_sizes} must all be positive")
            if sum(self.group_sizes) != n_latents:
                raise ValueError(f"group_sizes {self.group_sizes} sum to {sum(self.group_sizes)}, "
                                 f"not n_latents = {n_latents}")
        elif self.groups > n_latents:
            raise ValueError(f"{self.groups} groups need at least as many latents, not {n_latents}")

    def sizes(self, n_latents: int) -> list[int]:
        """The group sizes for a dictionary of ``n_latents``."""
        if self.group_sizes is not None:
            return list(self.group_sizes)
        weights = [2.0**i for i in range(self.groups)]
        ends = [round(n_latents * sum(weights[: i + 1]) / sum(weights)) for i in range(self.groups)]
        sizes = [e - s for s, e in zip([0, *ends[:-1]], ends, strict=True)]
        return [max(1, s) for s in sizes[:-1]] + [n_latents - sum(max(1, s) for s in sizes[:-1])]


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"
    saelens_architecture = "jumprelu"

    @property
    def group_ends(self) -> list[int]:
        """Where each nested prefix ends (the last is n_latents)."""
        sizes = self.cfg.sae.sizes(self.n_latents)  # type: ignore[attr-defined]
        return [sum(sizes[: i + 1]) for i in range(len(sizes))]

    def decode_codes(self, codes: Codes, ctx: TrainContext) -> Tensor:
        """The whole dictionary's x̂, keeping every shorter prefix's x̂ for the loss."""
        z_BN = codes.dense_BN
        assert z_BN is not None
        recon_BD = self.b_dec.expand(z_BN.shape[0], -1)
        prefixes = []
        start = 0
        for end in self.group_ends:
            recon_BD = recon_BD + z_BN[:, start:end] @ self.W_dec[start:end]
            prefixes.append(recon_BD)
            start = end
        codes.extras["prefix_recons"] = prefixes[:-1]  # each [B, D]
        return recon_BD

    def auxiliary_losses(self, target: Tensor, recon: Tensor, codes: Codes,
                         ctx: TrainContext) -> dict[str, tuple[float, Tensor]]:
        prefix_mse = target.new_zeros(())
        for prefix_BD in codes.extras["prefix_recons"]:
            prefix_mse = prefix_mse + squared_error(target, prefix_BD)
        return {"prefix_mse": (1.0, prefix_mse), **super().auxiliary_losses(target, recon, codes, ctx)}
