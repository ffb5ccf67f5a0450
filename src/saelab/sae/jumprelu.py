"""JumpReLU SAE (Rajamanoharan et al. 2024): z = pre · H(pre − θ) with a learned
threshold θ per latent (log-parameterised), trained with an L0 penalty. H has no useful
gradient, so θ learns through straight-through estimators: a rectangle kernel of width ε
around the threshold gives the pseudo-derivatives ∂/∂θ."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from saelab.config import SAEConfig
from saelab.sae.base import SAE, ForwardOutput, TrainContext, squared_error


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
        # Set by init_weights (from the training config) or by loading saved weights.
        self.log_threshold = nn.Parameter(torch.zeros(cfg.n_latents, dtype=self.W_dec.dtype))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        super().init_weights(generator)
        init = float(self.cfg.train.get("jumprelu_init_threshold", 0.1))
        self.log_threshold.fill_(math.log(init))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold)

    def training_forward(self, x: Tensor, ctx: TrainContext) -> ForwardOutput:
        pre = self.pre_activations(x)
        theta = self.threshold
        z = _JumpReLU.apply(pre.relu(), theta, ctx.jumprelu_bandwidth)
        recon = self.decode(z)
        mse = squared_error(x, recon)
        l0_penalty = _Step.apply(pre, theta, ctx.jumprelu_bandwidth).sum(-1).mean()
        loss = mse + ctx.sparsity_coefficient * l0_penalty
        active = z > 0
        return ForwardOutput(
            recon, loss, {"mse": mse.detach(), "l0_penalty": l0_penalty.detach()},
            active.any(0), active.sum(-1).float().mean(),
        )

    def saelens_tensors(self) -> dict[str, Tensor]:
        out = super().saelens_tensors()
        out["threshold"] = self.threshold
        return out

    def _assign_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        super()._assign_saelens_tensors(tensors)
        self.log_threshold.copy_(tensors["threshold"].clamp_min(1e-12).log())
