"""The optimisers the training loop can step: Adam, and schedule-free signum.

``adam``: torch's Adam, fused into one kernel per parameter where this torch has one, with the
loop's linear warm-up and decay (the TopK paper's recipe).

``signum``: sign descent (steepest descent in the L∞ norm, Bernstein et al. 2018) under the
schedule-free averaging of Defazio et al. 2024, as EleutherAI sparsify trains by default. The
gradient is taken at ``y``, an interpolation between a running average ``x`` of the iterates and
the iterate ``z`` itself; ``z`` steps by ``-lr · sign(grad)``; ``x`` is the weighted average of
every ``z`` (weights ∝ lr_max², uniform at a constant LR), so no decay schedule is needed. The
parameters hold ``y`` while training and ``x`` once :meth:`ScheduleFreeSignum.eval` is called:
the SAE that is saved is the average. The step is the same arithmetic as ``schedulefree``'s
``ScheduleFreeWrapper(SignSGD(...), momentum=0.95)`` (tests/test_optim.py checks it against that
package) in three in-place passes over each parameter instead of nine.

Both keep everything they need in ``state_dict()``, so a run resumed from a checkpoint takes the
same steps as one that never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, get_args

import torch
from torch import Tensor

OptimizerName = Literal["adam", "signum"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)


def adam(params: Iterable[Tensor], lr: float) -> torch.optim.Adam:
    """Adam, fused into one kernel per parameter (about 18x faster than the per-op loop on a
    CPU at 2 x 18.9M parameters) wherever this torch has a fused kernel for the device."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # a device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr)


class ScheduleFreeSignum(torch.optim.Optimizer):
    """Schedule-free sign descent. ``momentum`` is the interpolation weight β of ``y = β·x + (1-β)·z``
    (sparsify: 0.95); ``weight_lr_power`` weights each iterate in the average by lr_max to that
    power (2, as in schedulefree)."""

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.95,
                 weight_lr_power: float = 2.0) -> None:
        if lr <= 0 or not 0 < momentum < 1:
            raise ValueError(f"ScheduleFreeSignum needs lr > 0 and 0 < momentum < 1, got {lr}, {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_lr_power": weight_lr_power,
                                  "k": 0, "weight_sum": 0.0, "lr_max": 0.0})
        self.averaged = False  # whether the parameters hold x (eval) rather than y (train)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("ScheduleFreeSignum takes no closure")
        if self.averaged:
            raise RuntimeError("the parameters hold the average: call train() before stepping")
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            group["lr_max"] = lr_max = max(lr, group["lr_max"])
            weight = lr_max ** group["weight_lr_power"]
            group["weight_sum"] += weight
            c = weight / group["weight_sum"] if group["weight_sum"] > 0 else 1.0
            ps = [p for p in group["params"] if p.grad is not None]
            for p in ps:
                if "z" not in self.state[p]:
                    self.state[p]["z"] = p.detach().clone()
            zs = [self.state[p]["z"] for p in ps]
            if ps:  # one kernel per operation over every parameter (the loop's overhead matters
                # for small dictionaries, where a step takes a few milliseconds)
                # With x = (y - (1-β) z) / β:  z' = z - lr·sign(g);  x' = (1-c) x + c z';
                # y' = β x' + (1-β) z' = (1-c)(y - (1-β) z) + (βc + 1 - β) z'.
                torch._foreach_add_(ps, zs, alpha=-(1 - beta))
                torch._foreach_mul_(ps, 1 - c)
                torch._foreach_add_(zs, torch._foreach_sign([p.grad for p in ps]), alpha=-lr)
                torch._foreach_add_(ps, zs, alpha=beta * c + 1 - beta)
            group["k"] += 1

    @torch.no_grad()
    def eval(self) -> None:
        """Put the average x in the parameters (y = β x + (1-β) z, so x = (y - (1-β) z) / β)."""
        if not self.averaged:
            self._lerp(lambda beta: 1 - 1 / beta)
            self.averaged = True

    @torch.no_grad()
    def train(self) -> None:
        """Put y back in the parameters."""
        if self.averaged:
            self._lerp(lambda beta: 1 - beta)
            self.averaged = False

    def _lerp(self, weight: Any) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                z = self.state[p].get("z")
                if z is not None:
                    p.lerp_(z, weight(group["momentum"]))


def make(name: str, params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return adam(params, lr)
    if name == "signum":
        return ScheduleFreeSignum(params, lr)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def default_lr(name: str, n_latents: int) -> float:
    """Each optimiser's LR rule in the dictionary size: Adam 2e-4 / sqrt(n / 2^14) (the TopK
    paper's); signum 2.5e-3 / sqrt(n / 2^14), half of sparsify's rule: on inputs scaled to
    E||x||^2 = d_in it gave a lower held-out FVU at every budget from 90k to 1.4M tokens
    (benchmarks/peers/time_to_quality.md), where sparsify's rule stops improving after 0.7M."""
    base = 2e-4 if name == "adam" else 2.5e-3
    return base / math.sqrt(n_latents / 2**14)


def averaged(optimizer: torch.optim.Optimizer, on: bool) -> None:
    """Put the weights to evaluate (the average, for a schedule-free optimiser) in the parameters,
    or the weights to train at back (nothing to do for Adam)."""
    if isinstance(optimizer, ScheduleFreeSignum):
        optimizer.eval() if on else optimizer.train()


@torch.no_grad()
def forget_rows(optimizer: torch.optim.Optimizer, param: Tensor, rows: Tensor) -> None:
    """Forget what the optimiser learnt of ``rows`` of ``param`` (latents just resampled): Adam's
    moments are zeroed; a schedule-free average restarts at the new rows."""
    st = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in st:
            st[key][rows] = 0
    if "z" in st:
        st["z"][rows] = param[rows]
