"""Gated SAE (Rajamanoharan et al. 2024): a gate path decides which latents fire and a
magnitude path, sharing the encoder directions, says how strongly:

    π_gate = (x − b_dec) W_enc + b_gate          f = 1[π_gate > 0] · ReLU(π_mag)
    π_mag  = (x − b_dec) (W_enc ⊙ exp(r_mag)) + b_mag

Loss: ‖x − x̂‖² + λ Σ ReLU(π_gate)ᵢ ‖W_dec,ᵢ‖ + ‖x − x̂_gate‖², where x̂_gate decodes
ReLU(π_gate) through a frozen copy of the decoder so the gate learns to reconstruct."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from saelab.sae.base import SAE, Codes, TrainContext, squared_error
from saelab.sae.config import SAEConfig
from saelab.sae.relu import L1Config


class GatedConfig(L1Config):
    """Gated: separate gate and magnitude paths over shared directions, L1 on the gate."""

    architecture: Literal["gated"] = "gated"


class GatedSAE(SAE):
    architecture = "gated"
    saelens_architecture = "gated"
    unit_norm_decoder = False
    encoder_bias_names = ("b_gate", "b_mag", "r_mag")

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        dtype = self.W_dec.dtype
        self.b_gate = nn.Parameter(torch.zeros(cfg.n_latents, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(cfg.n_latents, dtype=dtype))
        self.r_mag = nn.Parameter(torch.zeros(cfg.n_latents, dtype=dtype))

    def _paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.centered(x) @ self.W_enc
        return h + self.b_gate, h * self.r_mag.exp() + self.b_mag

    def encode(self, x: Tensor) -> Tensor:
        gate, mag = self._paths(x)
        return (gate > 0) * mag.relu()

    def training_codes(self, x: Tensor, ctx: TrainContext) -> Codes:
        gate_BN, mag_BN = self._paths(x)
        return Codes(dense_BN=(gate_BN > 0) * mag_BN.relu(), extras={"gate_BN": gate_BN})

    def auxiliary_losses(self, target: Tensor, recon: Tensor, codes: Codes,
                         ctx: TrainContext) -> dict[str, tuple[float, Tensor]]:
        gate_acts_BN = codes.extras["gate_BN"].relu()
        l1 = (gate_acts_BN * self.decoder_norms()).sum(-1).mean()
        aux = squared_error(target, gate_acts_BN @ self.W_dec.detach() + self.b_dec.detach())
        return {"l1": (ctx.sparsity_coefficient, l1), "gate_aux": (1.0, aux)}
