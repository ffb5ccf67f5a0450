"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations of each row (ReLU'd),
decode through only those k latents, and revive dead latents with the AuxK loss — the
residual x − x̂ reconstructed by the top ``k_aux`` dead latents, weighted by α = 1/32."""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.sae.base import SAE, ForwardOutput, TrainContext, squared_error
from saelab.sae.kernels import dense_from_sparse, sparse_decode, topk_encode


def aux_k_loss(
    x: Tensor, recon: Tensor, aux_values: Tensor | None, aux_indices: Tensor | None,
    W_dec: Tensor,
) -> Tensor:
    """‖e − ê‖² where e = x − x̂ (no gradient) and ê is decoded from the dead latents."""
    if aux_values is None or aux_indices is None:
        return x.new_zeros(())
    residual = (x - recon).detach()
    return squared_error(residual, sparse_decode(aux_values, aux_indices, W_dec))


class TopKSAE(SAE):
    architecture = "topk"
    saelens_architecture = "topk"

    @property
    def k(self) -> int:
        assert self.cfg.k is not None
        return self.cfg.k

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices), each [..., k]: the k active latents of each row."""
        shape = x.shape[:-1]
        codes = topk_encode(
            (x.reshape(-1, self.d_in) - self.b_dec), self.enc_rows, self.b_enc, self.k
        )
        return codes.values.reshape(*shape, self.k), codes.indices.reshape(*shape, self.k)

    def encode(self, x: Tensor) -> Tensor:
        values, indices = self.encode_sparse(x)
        dense = dense_from_sparse(values.reshape(-1, self.k), indices.reshape(-1, self.k),
                                  self.n_latents)
        return dense.reshape(*x.shape[:-1], self.n_latents)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = x.to(self.W_dec.dtype)
        values, indices = self.encode_sparse(x)
        flat = sparse_decode(values.reshape(-1, self.k), indices.reshape(-1, self.k), self.W_dec)
        return flat.reshape(x.shape) + self.b_dec

    def training_forward(self, x: Tensor, ctx: TrainContext) -> ForwardOutput:
        k_aux = min(ctx.k_aux, int(ctx.dead_mask.sum())) if ctx.dead_mask is not None else 0
        codes = topk_encode(
            x - self.b_dec, self.enc_rows, self.b_enc, self.k,
            ctx.dead_mask if k_aux > 0 else None, k_aux, ctx.workspace,
        )
        recon = sparse_decode(codes.values, codes.indices, self.W_dec) + self.b_dec
        mse = squared_error(x, recon)
        aux = aux_k_loss(x, recon, codes.aux_values, codes.aux_indices, self.W_dec)
        loss = mse + ctx.aux_k_coefficient * aux
        fired = torch.zeros(self.n_latents, dtype=torch.bool, device=x.device)
        fired[codes.indices[codes.values > 0]] = True
        l0 = (codes.values > 0).sum(-1).float().mean()
        return ForwardOutput(recon, loss, {"mse": mse.detach(), "auxk": aux.detach()}, fired, l0)
