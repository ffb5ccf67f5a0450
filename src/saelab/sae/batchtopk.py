"""BatchTopK SAE (Bussmann et al. 2024): keep the top ``k · B`` activations over the whole
batch, so rows get a variable number of latents averaging k. At inference a single learned
threshold θ replaces the batch: z = ReLU(pre) · 1[pre > θ]. θ tracks the smallest kept
activation by an exponential moving average. Saved as a JumpReLU SAE with θ per latent,
as SAELens does."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from saelab.sae.arch import KSparseConfig
from saelab.sae.base import SAE, Codes, TrainContext
from saelab.sae.config import SAEConfig
from saelab.sae.topk import aux_k_loss


class BatchTopKConfig(KSparseConfig):
    """BatchTopK: k active latents per row on average over the batch; a learned threshold at
    inference."""

    architecture: Literal["batchtopk"] = "batchtopk"
    threshold_ema: float = Field(
        default=0.01, gt=0, le=1,
        description="Step of the moving average that tracks the smallest kept activation (the "
        "inference threshold).",
    )


class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"
    latent_dims: ClassVar[dict[str, int | None]] = {**SAE.latent_dims, "threshold": None}

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    @property
    def k(self) -> int:
        return self.cfg.sae.k  # type: ignore[attr-defined,no-any-return]

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold.to(pre.dtype))

    def batch_top(self, acts_BN: Tensor, k: int) -> Tensor:
        """The top ``k · B`` of ``acts_BN`` over the whole batch, the rest zero; the inference
        threshold follows the smallest one kept."""
        flat = acts_BN.flatten()
        values, indices = flat.topk(min(k * acts_BN.shape[0], flat.numel()), sorted=False)
        z_BN = torch.zeros_like(flat).scatter_(0, indices, values).view_as(acts_BN)
        with torch.no_grad():
            kept = values[values > 0]
            if kept.numel():
                self.threshold.lerp_(kept.min().to(torch.float64),
                                     self.cfg.sae.threshold_ema)  # type: ignore[attr-defined]
        return z_BN

    def training_codes(self, x: Tensor, ctx: TrainContext) -> Codes:
        acts_BN = self.pre_activations(x).relu()
        return Codes(dense_BN=self.batch_top(acts_BN, self.k), extras={"acts_BN": acts_BN})

    def auxiliary_losses(self, target: Tensor, recon: Tensor, codes: Codes,
                         ctx: TrainContext) -> dict[str, tuple[float, Tensor]]:
        aux = target.new_zeros(())
        k_aux = self.cfg.sae.resolved_k_aux(self.d_in)  # type: ignore[attr-defined]
        if ctx.dead_mask is not None and k_aux > 0:
            k_aux = min(k_aux, int(ctx.dead_mask.sum()))
            if k_aux > 0:
                acts_BN = codes.extras["acts_BN"]
                aux_v, aux_i = acts_BN.masked_fill(~ctx.dead_mask, -1.0).topk(k_aux, dim=-1)
                aux = aux_k_loss(target, recon, self.sparse_decode(aux_v.relu(), aux_i))
        return {"auxk": (self.cfg.sae.aux_k_coefficient, aux)}  # type: ignore[attr-defined]

    def saelens_tensors(self) -> dict[str, Tensor]:
        out = super().saelens_tensors()
        out["threshold"] = self.threshold.to(self.W_dec.dtype).expand(self.n_latents)
        return out

    def _assign_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        super()._assign_saelens_tensors(tensors)
        self.threshold.copy_(tensors["threshold"].to(torch.float64).mean())
