"""BatchTopK SAE (Bussmann et al. 2024): keep the top ``k · B`` activations over the whole
batch, so rows get a variable number of latents averaging k. At inference a single learned
threshold θ replaces the batch: z = ReLU(pre) · 1[pre > θ]. θ tracks the smallest kept
activation by an exponential moving average. Saved as a JumpReLU SAE with θ per latent,
as SAELens does."""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.config import SAEConfig
from saelab.sae.base import SAE, ForwardOutput, TrainContext, squared_error
from saelab.sae.topk import aux_k_loss

THRESHOLD_EMA = 0.01


class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    @property
    def k(self) -> int:
        assert self.cfg.k is not None
        return self.cfg.k

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold.to(pre.dtype))

    def training_forward(self, x: Tensor, ctx: TrainContext) -> ForwardOutput:
        acts = self.pre_activations(x).relu()
        flat = acts.flatten()
        values, indices = flat.topk(min(self.k * x.shape[0], flat.numel()), sorted=False)
        z = torch.zeros_like(flat).scatter_(0, indices, values).view_as(acts)
        recon = self.decode(z)
        mse = squared_error(x, recon)
        active = z > 0
        with torch.no_grad():
            kept = values[values > 0]
            if kept.numel():
                self.threshold.lerp_(kept.min().to(torch.float64), THRESHOLD_EMA)
        aux = x.new_zeros(())
        if ctx.dead_mask is not None and ctx.k_aux > 0:
            k_aux = min(ctx.k_aux, int(ctx.dead_mask.sum()))
            if k_aux > 0:
                aux_v, aux_i = acts.masked_fill(~ctx.dead_mask, -1.0).topk(k_aux, dim=-1)
                aux = aux_k_loss(x, recon, aux_v.relu(), aux_i, self.W_dec)
        loss = mse + ctx.aux_k_coefficient * aux
        return ForwardOutput(
            recon, loss, {"mse": mse.detach(), "auxk": aux.detach()}, active.any(0),
            active.sum(-1).float().mean(),
        )

    def saelens_tensors(self) -> dict[str, Tensor]:
        out = super().saelens_tensors()
        out["threshold"] = self.threshold.to(self.W_dec.dtype).expand(self.n_latents)
        return out

    def _assign_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        super()._assign_saelens_tensors(tensors)
        self.threshold.copy_(tensors["threshold"].to(torch.float64).mean())

