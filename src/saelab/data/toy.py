"""Synthetic superposition data with known ground truth (Sharkey, Braun & Millidge 2022,
*Taking features out of superposition with sparse autoencoders*).

More ground-truth features than dimensions: each feature is a random unit direction in
R^d; each row activates a few features, feature i with probability p_i that falls off
as a power law in i, with a uniform [0, 1] coefficient. Optionally features come in
correlated groups (a group turns on and its members tend to fire together), or in a
hierarchy (a child fires only when its parent fires, at most one child of a firing
parent), and Gaussian noise is added. An SAE has found the features when its decoder rows match the
true directions (MMCS, see :mod:`saelab.eval.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field, model_validator
from torch import Tensor

from saelab.config_base import Config as _Config


class ToyDataConfig(_Config):
    d_in: int = Field(default=64, gt=0, description="Dimension of the data.")
    n_features: int = Field(default=256, gt=0, description="Ground-truth features (> d_in: superposition).")
    avg_active: float = Field(default=5.0, gt=0, description="Mean number of features active per row.")
    frequency_decay: float = Field(
        default=0.5, ge=0, description="Feature i fires with probability ∝ (i+1)^-decay."
    )
    correlated_groups: int = Field(
        default=0, ge=0, description="Number of correlated feature groups (0: independent)."
    )
    group_size: int = Field(default=4, gt=1, description="Features per correlated group.")
    group_correlation: float = Field(
        default=0.5, ge=0, le=1, description="Extra firing probability of a member of an active group."
    )
    hierarchy_parents: int = Field(
        default=0, ge=0, description="Parent features with children of their own (0: no hierarchy); they "
        "are the last features but their children."
    )
    children_per_parent: int = Field(default=4, ge=1, description="Children of each parent feature.")
    child_probability: float = Field(
        default=0.8, ge=0, le=1, description="When a parent fires, one of its children (uniform) fires with "
        "this probability; a child never fires without its parent."
    )
    noise_std: float = Field(default=0.01, ge=0, description="Std of per-coordinate Gaussian noise.")
    seed: int = Field(default=0, description="Seed for the features and the rows.")

    @model_validator(mode="after")
    def _check(self) -> ToyDataConfig:
        if self.correlated_groups * self.group_size + self.hierarchy_features > self.n_features:
            raise ValueError("correlated_groups * group_size + hierarchy_parents * (1 + children_per_parent) "
                             "exceeds n_features")
        if self.avg_active >= self.n_features:
            raise ValueError("avg_active must be below n_features")
        return self

    @property
    def hierarchy_features(self) -> int:
        return self.hierarchy_parents * (1 + self.children_per_parent)


@dataclass
class ToyData:
    features: Tensor  # [n_features, d_in], unit rows: the ground truth
    probabilities: Tensor  # [n_features] firing probability of each feature
    config: ToyDataConfig

    @property
    def parents(self) -> Tensor:
        """Indices of the parent features [P] (empty without a hierarchy)."""
        cfg = self.config
        start = cfg.n_features - cfg.hierarchy_features
        return torch.arange(start, start + cfg.hierarchy_parents)

    @property
    def children(self) -> Tensor:
        """Indices of each parent's children [P, children_per_parent]."""
        cfg = self.config
        start = cfg.n_features - cfg.hierarchy_parents * cfg.children_per_parent
        return torch.arange(start, cfg.n_features).view(cfg.hierarchy_parents, cfg.children_per_parent)

    def sample(self, n_rows: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n_rows`` rows of data and their true coefficients [n_rows, n_features]."""
        cfg = self.config
        g = torch.Generator().manual_seed(seed)
        fires = torch.rand(n_rows, cfg.n_features, generator=g) < self.probabilities
        if cfg.correlated_groups:
            members = cfg.correlated_groups * cfg.group_size
            group_p = self.probabilities[:members].view(cfg.correlated_groups, cfg.group_size)
            group_on = torch.rand(n_rows, cfg.correlated_groups, generator=g) < group_p.mean(1)
            joint = torch.rand(n_rows, members, generator=g) < cfg.group_correlation
            fires[:, :members] |= group_on.repeat_interleave(cfg.group_size, 1) & joint
        if cfg.hierarchy_parents:
            children = self.children
            fires[:, children.flatten()] = False
            pick = torch.randint(cfg.children_per_parent, (n_rows, cfg.hierarchy_parents), generator=g)
            child_on = fires[:, self.parents] & (
                torch.rand(n_rows, cfg.hierarchy_parents, generator=g) < cfg.child_probability)
            rows, parent = child_on.nonzero(as_tuple=True)
            fires[rows, children[parent, pick[rows, parent]]] = True
        coeffs = torch.rand(n_rows, cfg.n_features, generator=g) * fires
        x = coeffs @ self.features
        if cfg.noise_std:
            x += cfg.noise_std * torch.randn(x.shape, generator=g)
        return x, coeffs


def make_toy_data(cfg: ToyDataConfig | None = None) -> ToyData:
    cfg = cfg or ToyDataConfig()
    g = torch.Generator().manual_seed(cfg.seed)
    features = torch.randn(cfg.n_features, cfg.d_in, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    weights = (torch.arange(cfg.n_features, dtype=torch.float64) + 1) ** -cfg.frequency_decay
    probs = (weights / weights.sum() * cfg.avg_active).clamp(max=1.0).float()
    # Shuffle which feature is rare so frequency is unrelated to feature index.
    probs = probs[torch.randperm(cfg.n_features, generator=g)]
    return ToyData(features, probs, cfg)
