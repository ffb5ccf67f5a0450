"""ReLU SAE with a decoder-norm-weighted L1 penalty (Towards Monosemanticity; Anthropic's
April 2024 update): L = ‖x − x̂‖² + λ Σᵢ zᵢ ‖W_dec,ᵢ‖. Decoder rows are free; their norm
is in the penalty, so the model cannot shrink latents by growing the decoder."""

from __future__ import annotations

from torch import Tensor

from saelab.sae.base import SAE, ForwardOutput, TrainContext, squared_error


class ReluSAE(SAE):
    architecture = "relu"
    saelens_architecture = "standard"
    unit_norm_decoder = False

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_activations(x).relu()

    def training_forward(self, x: Tensor, ctx: TrainContext) -> ForwardOutput:
        z = self.pre_activations(x).relu()
        recon = self.decode(z)
        mse = squared_error(x, recon)
        l1 = (z * self.decoder_norms()).sum(-1).mean()
        loss = mse + ctx.sparsity_coefficient * l1
        active = z > 0
        return ForwardOutput(
            recon, loss, {"mse": mse.detach(), "l1": l1.detach()}, active.any(0),
            active.sum(-1).float().mean(),
        )
