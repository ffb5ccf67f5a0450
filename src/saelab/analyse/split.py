"""Feature splitting: how the features of a small dictionary reappear in a larger one.

Towards Monosemanticity saw a feature of a small dictionary split into several finer
features as the dictionary grows. Features of two dictionaries trained on the same
activations are matched by the cosine of their decoder directions: each feature of the
larger dictionary has as *parent* the feature of the smaller one its direction is closest
to, and a small feature's *descendants* are the large features whose parent it is (above a
cosine floor), closest first. Two further measures judge a family:

- ``family_cosine``: the cosine between the parent's direction and the sum of its
  descendants' directions, each weighted by its mean activation where it fires: near 1
  when the parent is (a positive mix of) its descendants, as in a clean split;
- ``correlation``: with activations to hand, the Pearson correlation over tokens between
  the parent's activation and each descendant's, and between the parent's activation and
  the descendants' summed activation (``family_correlation``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saelab.errors import InputError
from saelab.sae.base import SAE


@dataclass
class Descendant:
    feature: int
    cosine: float                  # decoder cosine with the parent
    correlation: float | None = None  # activation correlation with the parent
    label: str | None = None


@dataclass
class Family:
    parent: int
    descendants: list[Descendant]
    family_cosine: float           # parent direction vs the weighted sum of its descendants'
    family_correlation: float | None = None
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def directions(sae: SAE) -> Tensor:
    """Unit decoder directions, [n_latents, d_in], float32 on the CPU."""
    w = sae.W_dec.detach().float().cpu()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def parents(small: SAE, large: SAE, chunk: int = 4096,
            small_alive: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """For every feature of ``large``: (its closest feature in ``small``, that cosine),
    among the features of ``small`` marked alive (default: all)."""
    if small.d_in != large.d_in:
        raise InputError(f"the dictionaries read activations of width {small.d_in} and {large.d_in}; "
                         "splitting compares dictionaries of the same hook")
    ds, dl = directions(small), directions(large)
    penalty = torch.zeros(len(ds)) if small_alive is None else (~small_alive).float() * -4.0
    best, cos = [], []
    for a in range(0, len(dl), chunk):
        c, i = (dl[a:a + chunk] @ ds.T + penalty).max(dim=1)
        best.append(i)
        cos.append(c)
    return torch.cat(best), torch.cat(cos)


def _encode_rows(sae: SAE, rows: Tensor, batch: int = 8192) -> Tensor:
    with torch.no_grad():
        return torch.cat([sae.encode(rows[a:a + batch].to(sae.device, sae.W_dec.dtype)).float().cpu()
                          for a in range(0, len(rows), batch)])


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Correlation of column vector ``a`` [n] with every column of ``b`` [n, m]."""
    a = a - a.mean()
    b = b - b.mean(0)
    den = (a.norm() * b.norm(dim=0)).clamp_min(1e-12)
    return (a @ b) / den


def families(small: SAE, large: SAE, features: list[int] | None = None, min_cosine: float = 0.3,
             rows: Tensor | None = None, top: int = 8) -> list[Family]:
    """The families of ``features`` of ``small`` (default: every feature with at least two
    descendants, largest families first) in ``large``. ``rows``: activations [n, d_in] to
    weight directions by mean activation, to correlate activations over, and to leave out
    the features that never fire on them."""
    n_small = small.n_latents
    for f in features or []:
        if not 0 <= f < n_small:
            raise InputError(f"feature {f} is not in the smaller dictionary (0 to {n_small - 1})")
    zs = zl = None
    weight = torch.ones(large.n_latents)
    alive_small = alive_large = None
    if rows is not None:
        # Features that never fire on the rows are left out: a dead latent keeps its random
        # initial direction, which says nothing about what the other dictionary learned.
        zs, zl = _encode_rows(small, rows), _encode_rows(large, rows)
        fired = (zl > 0).sum(0)
        alive_small, alive_large = (zs > 0).any(0), fired > 0
        weight = zl.sum(0) / fired.clamp_min(1)
    parent, cos = parents(small, large, small_alive=alive_small)
    keep = cos >= min_cosine
    if alive_large is not None:
        keep &= alive_large
    if features is None:
        counts = torch.bincount(parent[keep], minlength=n_small)
        features = [int(i) for i in torch.argsort(counts, descending=True, stable=True) if counts[i] >= 2]
    ds, dl = directions(small), directions(large)
    out = []
    for f in features:
        idx = torch.nonzero(keep & (parent == f)).flatten()
        idx = idx[torch.argsort(cos[idx], descending=True)][:top]
        corr: list[float | None] = [None] * len(idx)
        fam_corr = None
        if zs is not None and zl is not None and len(idx):
            corr = [float(c) for c in _pearson(zs[:, f], zl[:, idx])]
            fam_corr = float(_pearson(zs[:, f], zl[:, idx].sum(1, keepdim=True))[0])
        if len(idx):
            mix = (weight[idx, None] * dl[idx]).sum(0)
            fam_cos = float(mix @ ds[f] / mix.norm().clamp_min(1e-12))
        else:
            fam_cos = 0.0
        out.append(Family(f, [Descendant(int(j), float(cos[j]), c) for j, c in zip(idx, corr, strict=True)],
                          fam_cos, fam_corr))
    return out


def relatives(sae: SAE, others: dict[str, SAE], top: int = 3) -> dict[int, list[dict[str, Any]]]:
    """For every feature of ``sae``: its ``top`` closest features (decoder cosine) in each
    other dictionary, as {feature: [{dictionary, feature, cosine}]}."""
    mine = directions(sae)
    result: dict[int, list[dict[str, Any]]] = {i: [] for i in range(sae.n_latents)}
    for name, other in others.items():
        if other.d_in != sae.d_in:
            raise InputError(f"dictionary {name!r} reads width {other.d_in}, not {sae.d_in}")
        theirs = directions(other)
        for a in range(0, len(mine), 4096):
            c, i = (mine[a:a + 4096] @ theirs.T).topk(min(top, len(theirs)), dim=1)
            for r in range(len(c)):
                result[a + r].extend({"dictionary": name, "feature": int(j), "cosine": round(float(v), 4)}
                                     for j, v in zip(i[r], c[r], strict=True))
    return result


__all__ = ["Descendant", "Family", "families", "parents", "relatives"]
