"""The synthetic data with known features: a hierarchy's children fire only under their parent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from saelab.data.toy import ToyDataConfig, make_toy_data


def test_hierarchy_children_fire_only_with_their_parent_and_one_at_a_time() -> None:
    cfg = ToyDataConfig(d_in=32, n_features=80, avg_active=4, hierarchy_parents=6, children_per_parent=3,
                        child_probability=0.75, seed=1)
    data = make_toy_data(cfg)
    assert data.parents.tolist() == list(range(56, 62))
    assert data.children.shape == (6, 3) and data.children[0].tolist() == [62, 63, 64]
    _, coeffs = data.sample(40_000, seed=2)
    fires = coeffs > 0
    parent_on = fires[:, data.parents]  # [rows, P]
    children_on = fires[:, data.children]  # [rows, P, C]
    assert not (children_on.any(-1) & ~parent_on).any(), "a child fired without its parent"
    assert (children_on.sum(-1) <= 1).all(), "two children of one parent fired together"
    rate = children_on.any(-1)[parent_on].float().mean()
    assert abs(float(rate) - 0.75) < 0.02
    # each child gets its share
    share = children_on.sum(0).float() / children_on.sum((0, 2)).float()[:, None]
    assert torch.allclose(share, torch.full_like(share, 1 / 3), atol=0.05)


def test_no_hierarchy_leaves_the_data_as_it_was() -> None:
    """The default data (and so every earlier result) is what saelab 0.4 drew, bit for bit: the
    rows of the format-1 fixtures were sampled by it with these settings."""
    old = np.load(Path(__file__).parent / "fixtures" / "format_v1" / "x.npy")
    new = make_toy_data(ToyDataConfig(d_in=16, n_features=48, avg_active=3, seed=5)).sample(2560, seed=1)[0]
    assert np.array_equal(new.numpy(), old)
