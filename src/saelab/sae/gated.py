"""Gated SAE (Rajamanoharan et al. 2024): a gate path decides which latents fire and a
magnitude path, sharing the encoder directions, says how strongly:

    π_gate = (x − b_dec) W_enc + b_gate          f = 1[π_gate > 0] · ReLU(π_mag)
    π_mag  = (x − b_dec) (W_enc ⊙ exp(r_mag)) + b_mag

Loss: ‖x − x̂‖² + λ Σ ReLU(π_gate)ᵢ ‖W_dec,ᵢ‖ + ‖x − x̂_gate‖², where x̂_gate decodes
ReLU(π_gate) through a frozen copy of the decoder so the gate learns to reconstruct."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saelab.config import SAEConfig
from saelab.sae.base import SAE, ForwardOutput, TrainContext, squared_error


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
        h = (x - self.b_dec) @ self.W_enc
        return h + self.b_gate, h * self.r_mag.exp() + self.b_mag

    def encode(self, x: Tensor) -> Tensor:
        gate, mag = self._paths(x)
        return (gate > 0) * mag.relu()

    def training_forward(self, x: Tensor, ctx: TrainContext) -> ForwardOutput:
        gate, mag = self._paths(x)
        active = gate > 0
        z = active * mag.relu()
        recon = self.decode(z)
        mse = squared_error(x, recon)
        gate_acts = gate.relu()
        l1 = (gate_acts * self.decoder_norms()).sum(-1).mean()
        aux = squared_error(x, gate_acts @ self.W_dec.detach() + self.b_dec.detach())
        loss = mse + ctx.sparsity_coefficient * l1 + aux
        active = z > 0
        return ForwardOutput(
            recon, loss, {"mse": mse.detach(), "l1": l1.detach(), "gate_aux": aux.detach()},
            active.any(0), active.sum(-1).float().mean(),
        )
