"""ReLU SAE with a decoder-norm-weighted L1 penalty (Towards Monosemanticity; Anthropic's
April 2024 update): L = ‖x − x̂‖² + λ Σᵢ zᵢ ‖W_dec,ᵢ‖. Decoder rows are free; their norm
is in the penalty, so the model cannot shrink latents by growing the decoder."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from saelab.sae.arch import PenaltyConfig, balanced_norm
from saelab.sae.base import SAE, Codes, TrainContext


class L1Config(PenaltyConfig):
    """The L1 family (ReLU, Gated): a decoder-norm-weighted L1 penalty, free decoder norms,
    optional dead-latent resampling."""

    penalty_field = "l1_coefficient"
    name_field = ("l1_coefficient", "c")
    l1_coefficient: float = Field(default=5.0, ge=0, description="Decoder-norm-weighted L1 coefficient λ.")
    init_scale: Literal["unit", "balanced"] = Field(
        default="unit",
        description="Initial decoder rows: unit norm, or balanced: norm min(1, sqrt(2 d_in / n_latents)) "
        "(W_enc = W_decᵀ alike), so a large dictionary's initial reconstruction is about x's size "
        "instead of n_latents / (2 d_in) times it.",
    )
    resample_every_steps: int | None = Field(
        default=None, gt=0,
        description="Resample dead latents every N steps (Towards Monosemanticity) [default: never].",
    )

    def resampling_interval(self) -> int | None:
        return self.resample_every_steps

    def initial_decoder_norm(self, d_in: int, n_latents: int) -> float:
        return balanced_norm(d_in, n_latents) if self.init_scale == "balanced" else 1.0


class ReluConfig(L1Config):
    """ReLU + L1."""

    architecture: Literal["relu"] = "relu"


class ReluSAE(SAE):
    architecture = "relu"
    saelens_architecture = "standard"
    unit_norm_decoder = False

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_activations(x).relu()

    def training_codes(self, x: Tensor, ctx: TrainContext) -> Codes:
        return Codes(dense_BN=self.pre_activations(x).relu())

    def auxiliary_losses(self, target: Tensor, recon: Tensor, codes: Codes,
                         ctx: TrainContext) -> dict[str, tuple[float, Tensor]]:
        assert codes.dense_BN is not None
        l1 = (codes.dense_BN * self.decoder_norms()).sum(-1).mean()
        return {"l1": (ctx.sparsity_coefficient, l1)}
