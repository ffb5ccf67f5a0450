"""A sweep's measurements: every SAE of a grid on held-out rows, the reconstruction-sparsity
frontier ``frontier.png``, and, for a TopK grid with at least two dictionary sizes and two k,
the fit of the TopK paper's scaling law ``scaling.json`` / ``scaling.png``::

    log L(N, K) = α + β_k log K + β_n log N + γ log K log N

where L is the normalised MSE (FVU), N the number of latents and K the sparsity. The grid
itself is trained by :func:`saelab.train.sweep.train_grid`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saelab import stage
from saelab.activations.source import ActivationSource
from saelab.errors import InputError
from saelab.eval.metrics import evaluate_reconstruction
from saelab.io import atomic_save_figure, atomic_write_csv, atomic_write_json
from saelab.sae.arch import PenaltyConfig
from saelab.sae.base import WEIGHTS_FILENAME
from saelab.train.config import TrainConfig
from saelab.train.sweep import train_grid


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    csv: Path
    frontier: Path
    scaling: dict[str, Any] | None


def run_sweep(
    source: ActivationSource,
    base: TrainConfig,
    grid: dict[str, Sequence[Any]],
    out: str | Path,
    eval_source: ActivationSource | None = None,
    eval_rows: int = 100_000,
) -> SweepResult:
    """Train every cell of ``grid`` on one pass over ``source`` into ``out/<cell>/``, then
    measure each on ``eval_source`` (default: the first ``eval_rows`` rows of ``source``)."""
    out = Path(out)
    trained = train_grid(source, base, grid, out)
    evaluated = eval_source or source
    csv_path = out / "sweep.csv"
    # the measurements are reused while the SAEs (their weights) and the rows measured on are the same
    settings = stage.Settings("sweep evaluation", {
        "saes": {name: stage.file_identity(out / name / WEIGHTS_FILENAME) for _, name, _ in trained},
        "eval": evaluated.describe(), "eval_rows": eval_rows, "held_out": eval_source is not None})
    done = stage.finished(csv_path, settings)
    if done is not None:
        rows = done["rows"]
    else:
        rows = []
        for cfg, name, sae in trained:
            m = evaluate_reconstruction(sae, evaluated.rows(8192, limit=eval_rows))
            rows.append({
                "name": name, "architecture": cfg.architecture, "n_latents": sae.n_latents,
                "k": sae.cfg.k, "coefficient": _coefficient(cfg),
                "tokens": cfg.steps() * cfg.batch_size, **m.as_dict(),
                "eval": "held-out" if eval_source is not None else "training rows",
            })
        atomic_write_csv(rows, csv_path)
        stage.mark_finished(csv_path, settings, {"rows": rows})
    frontier = out / "frontier.png"
    plot_frontier(rows, frontier)
    scaling = None
    topk = [r for r in rows if r["architecture"] == "topk"]
    if len({r["n_latents"] for r in topk}) >= 2 and len({r["k"] for r in topk}) >= 2:
        scaling = fit_scaling_law([r["n_latents"] for r in topk], [r["k"] for r in topk],
                                  [r["fvu"] for r in topk])
        atomic_write_json(out / "scaling.json", scaling)
        plot_scaling(topk, scaling, out / "scaling.png")
    return SweepResult(rows, csv_path, frontier, scaling)


def _coefficient(cfg: TrainConfig) -> float | None:
    """The sparsity coefficient of a cell's architecture (None for the k-sparse ones)."""
    if isinstance(cfg.sae, PenaltyConfig):
        return float(getattr(cfg.sae, cfg.sae.penalty_field))
    return None


def fit_scaling_law(n: Sequence[float], k: Sequence[float], loss: Sequence[float]) -> dict[str, Any]:
    """Least squares of log L = α + β_k log K + β_n log N + γ log K log N."""
    ln, lk, ll = (np.log(np.asarray(v, dtype=np.float64)) for v in (n, k, loss))
    if len(ll) < 4:
        raise InputError(f"the scaling law has 4 parameters; a fit needs at least 4 SAEs, got {len(ll)}")
    a = np.stack([np.ones_like(ln), lk, ln, lk * ln], axis=1)
    coef, *_ = np.linalg.lstsq(a, ll, rcond=None)
    pred = a @ coef
    ss_res = float(((ll - pred) ** 2).sum())
    ss_tot = float(((ll - ll.mean()) ** 2).sum())
    alpha, beta_k, beta_n, gamma = (float(c) for c in coef)
    return {
        "form": "log L = alpha + beta_k log K + beta_n log N + gamma log K log N  (L = FVU)",
        "alpha": alpha, "beta_k": beta_k, "beta_n": beta_n, "gamma": gamma,
        "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0,
        "rms_log_residual": math.sqrt(ss_res / len(ll)),
        "points": len(ll),
    }


def predict(fit: dict[str, Any], n: float, k: float) -> float:
    ln, lk = math.log(n), math.log(k)
    return math.exp(fit["alpha"] + fit["beta_k"] * lk + fit["beta_n"] * ln + fit["gamma"] * lk * ln)


def plot_frontier(rows: list[dict[str, Any]], path: Path) -> None:
    """FVU against L0: one line per (architecture, dictionary size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["architecture"], r["n_latents"]), []).append(r)
    for (arch, n), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["l0"])
        ax.plot([r["l0"] for r in rs], [r["fvu"] for r in rs], "o-" if arch == "topk" else "s--",
                label=f"{arch}, {n:,} latents")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("FVU (normalised MSE)")
    ax.set_title("Reconstruction-sparsity frontier")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def plot_scaling(rows: list[dict[str, Any]], fit: dict[str, Any], path: Path) -> None:
    """FVU against dictionary size, one colour per k, with the fitted law."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ns = sorted({r["n_latents"] for r in rows})
    grid = np.geomspace(ns[0], ns[-1], 50)
    for i, k in enumerate(sorted({r["k"] for r in rows})):
        rs = sorted((r for r in rows if r["k"] == k), key=lambda r: r["n_latents"])
        c = f"C{i}"
        ax.plot([r["n_latents"] for r in rs], [r["fvu"] for r in rs], "o", color=c, label=f"k = {k}")
        ax.plot(grid, [predict(fit, n, k) for n in grid], "-", color=c, alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latents N")
    ax.set_ylabel("FVU")
    ax.set_title(f"L(N, K) fit: β_n = {fit['beta_n']:.3f}, β_k = {fit['beta_k']:.3f}, "
                 f"γ = {fit['gamma']:.3f}, R² = {fit['r2']:.3f}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def describe(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'SAE':<24} {'L0':>7} {'FVU':>8} {'dead':>7}"]
    for r in rows:
        lines.append(f"{r['name']:<24} {r['l0']:>7.1f} {r['fvu']:>8.4f} {100 * r['dead_fraction']:>6.1f}%")
    return "\n".join(lines)



__all__ = ["SweepResult", "describe", "fit_scaling_law", "predict", "run_sweep"]
