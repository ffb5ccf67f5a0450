"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations of each row (ReLU'd),
decode through only those k latents, and revive dead latents with the AuxK loss — the
residual x − x̂ reconstructed by the top ``k_aux`` dead latents, weighted by α = 1/32.

Its latents can be split over processes (``--latent-shards``): each shard takes its local
top-k, the communicator picks the global top-k among them and sums the partial decodes."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from saelab.sae.arch import KSparseConfig
from saelab.sae.base import SAE, Codes, TrainContext, squared_error
from saelab.sae.kernels import dense_from_sparse, topk_encode


class TopKConfig(KSparseConfig):
    """TopK: exactly k active latents per row, AuxK on the dead ones."""

    architecture: Literal["topk"] = "topk"

    def default_optimizer(self) -> str:
        return "signum"  # benchmarks/peers/time_to_quality.md


def aux_k_loss(x: Tensor, recon: Tensor, aux_recon: Tensor) -> Tensor:
    """‖e − ê‖² where e = x − x̂ (no gradient) and ê is decoded from the dead latents."""
    return squared_error((x - recon).detach(), aux_recon)


class TopKSAE(SAE):
    architecture = "topk"
    saelens_architecture = "topk"
    latent_sharding = True

    @property
    def k(self) -> int:
        return self.cfg.sae.k  # type: ignore[attr-defined,no-any-return]

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices), each [..., k]: the k active latents of each row."""
        shape = x.shape[:-1]
        codes = topk_encode(
            self.centered(x.reshape(-1, self.d_in)), self.enc_rows, self.b_enc, self.k
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
        flat = self.sparse_decode(values.reshape(-1, self.k), indices.reshape(-1, self.k))
        recon = flat.reshape(*x.shape[:-1], self.d_target) + self.b_dec
        skip = self.skip_term(x)
        return recon if skip is None else recon + skip

    def training_codes(self, x: Tensor, ctx: TrainContext) -> Codes:
        k_aux = self.cfg.sae.resolved_k_aux(self.d_in)  # type: ignore[attr-defined]
        if ctx.dead_mask is None:
            k_aux = 0
        elif k_aux > 0:
            n_dead = ctx.comm.sum_shards_(ctx.dead_mask.sum().reshape(1))
            k_aux = min(k_aux, int(n_dead))
        codes = topk_encode(
            self.centered(x), self.enc_rows, self.b_enc, self.k,
            ctx.dead_mask if k_aux > 0 else None, min(k_aux, self.n_latents), ctx.workspace,
        )
        values_BK = codes.values
        chosen = ctx.comm.select_top(values_BK, self.k)
        if chosen is not None:
            values_BK = values_BK * chosen
        extras = {}
        if k_aux > 0 and codes.aux_values is not None and codes.aux_indices is not None:
            aux_chosen = ctx.comm.select_top(codes.aux_values, k_aux)
            extras = {"aux_values_BK": codes.aux_values if aux_chosen is None
                      else codes.aux_values * aux_chosen, "aux_indices_BK": codes.aux_indices}
        return Codes(values_BK, codes.indices, extras=extras)

    def auxiliary_losses(self, target: Tensor, recon: Tensor, codes: Codes,
                         ctx: TrainContext) -> dict[str, tuple[float, Tensor]]:
        if "aux_values_BK" in codes.extras:
            decoded = self.sparse_decode(codes.extras["aux_values_BK"], codes.extras["aux_indices_BK"])
            aux = aux_k_loss(target, recon, ctx.comm.sum_shards(decoded))
        else:
            aux = target.new_zeros(())
        return {"auxk": (self.cfg.sae.aux_k_coefficient, aux)}  # type: ignore[attr-defined]

    def saelens_fields(self) -> dict[str, Any]:
        return {"k": self.k}
