"""``saelab bench``: the report card of one or more SAEs, every metric offline.

For each SAE folder (any that :meth:`SAE.load` reads: saelab, SAELens, sparsify,
dictionary_learning) and each metric asked for, the figures go to ``OUT/<name>/<metric>.json``
with a completion marker: a killed bench, run again, skips the metrics it finished and
measures the rest. Then ``OUT/<name>.json`` holds the SAE's whole card, ``OUT/bench.csv`` one
row of headline figures per SAE, ``OUT/bench.md`` the same as a table and ``OUT/bench.png`` one
bar chart per headline figure.

Metrics (one module each in :mod:`saelab.eval`):

``core``            :mod:`saelab.eval.splice` on held-out text: FVU, L0, dead and dense latents,
                    cos(x, x̂), relative reconstruction bias, CE loss recovered (SAELens/SAEBench
                    convention and saelab 0.5's), KL.
``sparse_probing``  :mod:`saelab.eval.probing`: k-sparse latent probes against the whole
                    activation on the binary tasks of :mod:`saelab.eval.tasks`.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab import stage
from saelab.config import BenchConfig, EvalConfig
from saelab.errors import InputError
from saelab.eval.probing import ProbeSettings, sparse_probing
from saelab.eval.splice import saved_splice_eval
from saelab.io import atomic_save_figure, atomic_write_json, atomic_write_text
from saelab.models import LoadedModel, open_model
from saelab.sae.base import SAE
from saelab.sae.foreign import weights_file

# metric -> headline figures (key in its JSON, column name)
HEADLINES: dict[str, tuple[tuple[str, str], ...]] = {
    "core": (("fvu", "fvu"), ("l0", "l0"), ("dead_fraction", "dead"), ("cossim", "cossim"),
             ("relative_reconstruction_bias", "rel_bias"), ("ce_recovered", "ce_recovered"),
             ("kl", "kl")),
    "sparse_probing": (("mean.baseline_accuracy", "probe_baseline"), ("mean.k=1", "probe_k1"),
                       ("mean.k=2", "probe_k2"), ("mean.k=5", "probe_k5"), ("mean.k=20", "probe_k20")),
}


@dataclass
class Card:
    name: str
    folder: Path
    metrics: dict[str, dict[str, Any]]

    def headline(self) -> dict[str, Any]:
        row: dict[str, Any] = {"sae": self.name}
        for metric, cols in HEADLINES.items():
            for key, col in cols:
                value: Any = self.metrics.get(metric)
                for part in key.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                row[col] = value
        return row


def _names(folders: list[Path]) -> list[str]:
    """A distinct short name per SAE folder: its own name, with its parents' where two clash."""
    names = [f.name for f in folders]
    for depth in range(2, 6):
        if len(set(names)) == len(names):
            break
        names = ["--".join(f.parts[-depth:]) for f in folders]
    if len(set(names)) != len(names):
        names = [f"{i}-{n}" for i, n in enumerate(names)]
    return names


class _Models:
    """Each model loaded once, on first use, for every SAE that reads it."""

    def __init__(self, device: str) -> None:
        self.device, self.loaded = device, {}

    def __call__(self, name: str) -> LoadedModel:
        if name not in self.loaded:
            self.loaded[name] = open_model(name, self.device)
        return self.loaded[name]


def bench(folders: list[Path], out: Path, cfg: BenchConfig,
          log: Callable[[str], None] = print) -> list[Card]:
    """Run ``cfg.metrics`` on every SAE in ``folders``; write the cards, CSV, table and plot
    under ``out``; return the cards."""
    if not folders:
        raise InputError("saelab bench: give at least one SAE folder")
    saes = [(name, Path(folder), SAE.load(folder))
            for name, folder in zip(_names(folders), folders, strict=True)]
    for _, folder, sae in saes:
        if not (cfg.model or sae.cfg.model_name):
            raise InputError(f"{folder}: its cfg.json names no model; pass --model")
        if not (cfg.hook or sae.cfg.hook_name):
            raise InputError(f"{folder}: its cfg.json names no hook point; pass --hook")
    out.mkdir(parents=True, exist_ok=True)
    models = _Models(cfg.device)
    cards = []
    for name, folder, sae in saes:
        model = cfg.model or sae.cfg.model_name
        assert model is not None
        figures = {}
        for metric in cfg.metrics:
            t = time.perf_counter()
            figures[metric], reused = _metric(metric, name, folder, sae, model, out, cfg, models)
            log(f"[{name}] {metric}: " + ("reused" if reused else f"{time.perf_counter() - t:.1f} s"))
        card = Card(name, folder, figures)
        atomic_write_json(out / f"{name}.json", {"sae": str(folder), "name": name, "model": model,
                                                 "architecture": sae.architecture, "n_latents": sae.n_latents,
                                                 "metrics": figures})
        cards.append(card)
    _write_tables(cards, out)
    return cards


def _metric(metric: str, name: str, folder: Path, sae: SAE, model: str, out: Path, cfg: BenchConfig,
            models: _Models) -> tuple[dict[str, Any], bool]:
    path = out / name / f"{metric}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    hook = cfg.hook or sae.cfg.hook_name
    if metric == "core":
        text = EvalConfig(corpus=cfg.corpus, device=cfg.device).text()
        return saved_splice_eval(folder, path, lambda: models(model), text, cfg.tokens, hook,
                                 progress=cfg.progress)
    probe = ProbeSettings(per_class=cfg.per_class, context_length=cfg.probe_context,
                          code_passages=cfg.code_passages)
    settings = stage.Settings.of("sparse probing", {"sae": stage.file_identity(weights_file(folder)),
                                                    "model": model, "hook": hook, **vars(probe)})
    return stage.json_result(path, settings,
                             lambda: sparse_probing(sae, models(model), hook, probe, progress=cfg.progress))


def _write_tables(cards: list[Card], out: Path) -> None:
    rows = [c.headline() for c in cards]
    cols = [c for c in rows[0] if any(r[c] is not None for r in rows)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "bench.csv", buf.getvalue())

    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    atomic_write_text(out / "bench.md", "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = [c for c in cols if c != "sae"]
    fig, axes = plt.subplots(1, len(figs), figsize=(2.2 * len(figs) + 1, 3.2), squeeze=False)
    for ax, col in zip(axes[0], figs, strict=True):
        values = [r[col] if r[col] is not None else 0.0 for r in rows]
        ax.bar(range(len(rows)), values, color="#4c72b0")
        ax.set_title(col, fontsize=9)
        ax.set_xticks(range(len(rows)), [r["sae"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, out / "bench.png")
