"""JumpReLU SAE (Rajamanoharan et al. 2024): z = pre · H(pre − θ) with a learned
threshold θ per latent (log-parameterised), trained with an L0 penalty. H has no useful
gradient, so θ learns through straight-through estimators: a rectangle kernel of width ε
around the threshold gives the pseudo-derivatives ∂/∂θ."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from saelab.sae.arch import PenaltyConfig
from saelab.sae.base import SAE, Codes, TrainContext
from saelab.sae.config import SAEConfig


class JumpReluConfig(PenaltyConfig):
    """JumpReLU: a learned threshold per latent, an L0 penalty through straight-through estimators."""

    architecture: Literal["jumprelu"] = "jumprelu"
    penalty_field = "l0_coefficient"
    name_field = ("l0_coefficient", "c")
    l0_coefficient: float = Field(default=0.05, ge=0, description="L0 penalty coefficient λ.")
    bandwidth: float = Field(default=0.05, gt=0, description="Straight-through estimator kernel width ε.")
    init_threshold: float = Field(default=0.1, gt=0, description="Initial per-latent threshold θ.")


def _kernel(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        grad_pre = grad * (pre > theta)
        grad_theta = (-(theta / ctx.eps) * _kernel((pre - theta) / ctx.eps) * grad)
        return grad_pre, grad_theta.reshape(-1, theta.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        grad_theta = -(1.0 / ctx.eps) * _kernel((pre - theta) / ctx.eps) * grad
        return None, grad_theta.reshape(-1, theta.shape[-1]).sum(0), None


class JumpReluSAE(SAE):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        # Set by init_weights (from the config) or by loading saved weights.
        self.log_threshold = nn.Parameter(torch.zeros(cfg.n_latents, dtype=self.W_dec.dtype))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        super().init_weights(generator)
        self.log_threshold.fill_(math.log(self.cfg.sae.init_threshold))  # type: ignore[attr-defined]

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold)

    def training_codes(self, x: Tensor, ctx: TrainContext) -> Codes:
        pre_BN = self.pre_activations(x)
        theta = self.threshold
        z_BN = _JumpReLU.apply(pre_BN.relu(), theta, self.cfg.sae.bandwidth)  # type: ignore[attr-defined]
        return Codes(dense_BN=z_BN, extras={"pre_BN": pre_BN, "theta": theta})

    def auxiliary_losses(self, target: Tensor, recon: Tensor, codes: Codes,
                         ctx: TrainContext) -> dict[str, tuple[float, Tensor]]:
        steps_BN = _Step.apply(codes.extras["pre_BN"], codes.extras["theta"],
                               self.cfg.sae.bandwidth)  # type: ignore[attr-defined]
        return {"l0_penalty": (ctx.sparsity_coefficient, steps_BN.sum(-1).mean())}

    def saelens_tensors(self) -> dict[str, Tensor]:
        out = super().saelens_tensors()
        out["threshold"] = self.threshold
        return out

    def _assign_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        super()._assign_saelens_tensors(tensors)
        self.log_threshold.copy_(tensors["threshold"].clamp_min(1e-12).log())
