"""*Towards Monosemanticity* at CPU scale: dictionaries of 1x-64x over a one-layer model's
MLP neurons, neurons against features, and features splitting as the dictionary grows.

Reads top to bottom, each stage reusing what a previous run of the same study finished:

1. harvest the hook (default ``blocks.0.mlp.hook_post``, the MLP neurons) on training
   documents, and a held-out store on held-out documents;
2. one sweep (one read of the data) of ReLU-L1 and TopK dictionaries at every size;
3. per dictionary: FVU, L0, dead and dense fractions on the held-out store, and CE loss
   recovered (zero- and mean-ablation baselines) spliced into the model on held-out text;
   ``results.csv`` / ``results.md`` and ``sizes.png`` (each measure against size);
4. neurons against features: the neurons as the identity dictionary, and the
   ``compare_size`` dictionary, each get an atlas; their per-feature interpretability
   measures (label confidence, token concentration of the top examples, a token-rule
   detection F1 on fresh held-out tokens) go to ``interpretability.csv`` and the
   histograms ``neurons_vs_features.png``;
5. feature splitting: atlases of the ``family_sizes`` dictionaries, the families of the
   smallest one traced through the larger ones (``splits.md``, ``splits.json``), and each
   atlas gets its features' relatives in the other dictionaries, for the viewer.

``study.json`` records the settings and the headline figures.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from saelab import stage
from saelab.activations.harvest import harvest
from saelab.activations.hooks import run_hooked
from saelab.activations.source import open_source
from saelab.analyse.atlas import build_atlas
from saelab.analyse.atlasdb import Atlas, add_relatives
from saelab.analyse.explain import show_token
from saelab.analyse.page import Example
from saelab.analyse.split import Family, families, relatives
from saelab.config import AtlasConfig, HarvestConfig, TextConfig, _Config, build
from saelab.data.text import text_batches
from saelab.eval.scaling import run_sweep
from saelab.eval.splice import saved_splice_eval
from saelab.io import atomic_save_figure, atomic_write_csv, atomic_write_json, atomic_write_text
from saelab.models import LoadedModel, open_model
from saelab.sae.base import SAE, WEIGHTS_FILENAME, create
from saelab.sae.config import SAEConfig
from saelab.train.config import TrainConfig

NEURONS = "neurons"


class MonosemanticityConfig(_Config):
    """The study's settings (every stage)."""

    model: str = Field(default="one-layer", description="Model: the committed one-layer model, or any path.")
    hook: str = Field(default="blocks.0.mlp.hook_post", description="Hook point: the MLP neurons.")
    corpus: str = Field(default="sotu+moby-dick+python-docs+python-stdlib", description="Corpus.")
    context_length: int = Field(default=256, ge=8, description="Tokens per window.")
    heldout_fraction: float | None = Field(
        default=None, ge=0, lt=1, description="Share of documents held out [default: the one the model "
        "was trained with (its lm.json), else 0.05], so held-out text is text the model never saw.",
    )
    tokens: int = Field(default=400_000, gt=0, description="Training rows harvested and trained on.")
    heldout_rows: int = Field(default=100_000, gt=0, description="Held-out rows for FVU, L0, dead, dense.")
    sizes: list[float] = Field(
        default=[1, 2, 4, 8, 16, 32, 64],
        min_length=1,
        description="Dictionary sizes as multiples of the hook's width.",
    )
    architectures: list[Literal["relu", "topk"]] = Field(
        default=["relu", "topk"], min_length=1, description="Architectures swept."
    )
    k: int = Field(default=16, gt=0, description="Active latents per token (topk).")
    l1_coefficient: float = Field(default=5.0, ge=0, description="L1 coefficient (relu).")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate (the study trains every "
                      "dictionary with Adam, as the committed figures were made).")
    batch_size: int = Field(default=1024, gt=0, description="Rows per step.")
    dead_after_tokens: int = Field(
        default=250_000, gt=0, description="Rows without firing before AuxK treats a latent as dead (topk)."
    )
    eval_tokens: int = Field(default=16_384, ge=0, description="Held-out tokens for CE loss recovered.")
    compare_size: float = Field(default=4, description="The dictionary compared with the neurons.")
    compare_architecture: Literal["relu", "topk"] = Field(default="topk", description="Its architecture.")
    family_sizes: list[float] = Field(
        default=[1, 4, 16],
        min_length=2,
        description="Sizes traced for feature splitting (each gets an atlas).",
    )
    atlas_tokens: int = Field(default=200_000, gt=0, description="Held-out tokens each atlas reads.")
    detect_tokens: int = Field(
        default=50_000, gt=0, description="Fresh held-out tokens for the token-rule detection score."
    )
    min_cosine: float = Field(default=0.4, ge=0, le=1, description="Decoder cosine a descendant needs.")
    seed: int = Field(default=0, description="Training seed.")
    device: str = Field(default="auto", description="Device: auto, cpu, cuda[:N].")
    progress: bool = Field(default=True, description="Show progress bars.")

    @classmethod
    def quick(cls) -> dict[str, Any]:
        return {
            "tokens": 200_000,
            "heldout_rows": 20_000,
            "sizes": [1, 2, 4, 8],
            "family_sizes": [1, 4],
            "atlas_tokens": 50_000,
            "detect_tokens": 20_000,
            "eval_tokens": 4096,
        }


def _name(arch: str, size: float) -> str:
    return f"{arch}-{size:g}x"


def identity_sae(d: int, model: str, hook: str) -> SAE:
    """The neurons as a dictionary: encoder and decoder the identity, ReLU (a neuron
    'fires' where it is positive)."""
    sae = create(SAEConfig(architecture="relu", d_in=d, n_latents=d, model_name=model, hook_name=hook))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae


def _say(cfg: MonosemanticityConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, flush=True)


# ------------------------------------------------------------------ measures per feature
def token_concentration(top: list[Example]) -> float | None:
    """1 − normalised entropy of the tokens the top examples peak on: 1 when every top
    example peaks on the same token, 0 when each peaks on a different one."""
    peaks = [e.t[e.peak] for e in top]
    if not peaks:
        return None
    if len(peaks) == 1:
        return 1.0
    p = np.array(list(Counter(peaks).values()), dtype=np.float64) / len(peaks)
    return float(1 + (p * np.log(p)).sum() / math.log(len(peaks)))


def rule_tokens(top: list[Example], n: int = 3) -> list[int]:
    """The token ids most of a feature's top examples peak on (its token-rule explanation)."""
    return [t for t, _ in Counter(e.t[e.peak] for e in top).most_common(n)]


def detection_f1(
    sae: SAE,
    lm: LoadedModel,
    hook: str,
    text: TextConfig,
    rules: list[list[int]],
    tokens: int,
    skip_windows: int,
) -> np.ndarray:
    """Per feature, the F1 of the rule 'fires exactly on its rule tokens' over ``tokens``
    held-out tokens after the first ``skip_windows`` windows (those the atlas read)."""
    n, vocab = sae.n_latents, int(lm.model.get_input_embeddings().weight.shape[0])
    member = torch.zeros(vocab, n, dtype=torch.bool)
    for f, toks in enumerate(rules):
        member[toks, f] = True
    tp = torch.zeros(n)
    pred = torch.zeros(n)
    fire = torch.zeros(n)
    seen = 0
    dev = lm.device
    for batch in text_batches(lm, text, "heldout", skip_windows=skip_windows):
        cap, _ = run_hooked(lm.model, batch.input_ids.to(dev), batch.attention_mask.to(dev), capture=[hook])
        mask = batch.content_mask
        x = cap[hook][mask.to(dev)].float()
        ids = batch.input_ids[mask]
        with torch.no_grad():
            fired = (sae.encode(x) > 0).cpu()
        rule = member[ids]
        tp += (fired & rule).sum(0)
        pred += rule.sum(0)
        fire += fired.sum(0)
        seen += len(ids)
        if seen >= tokens:
            break
    precision = tp / pred.clamp_min(1)
    recall = tp / fire.clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    f1[fire == 0] = float("nan")  # never fired on these tokens: no score
    return f1.numpy()


def interpretability(
    atlas_path: Path, sae: SAE, lm: LoadedModel, cfg: MonosemanticityConfig, text: TextConfig
) -> list[dict[str, Any]]:
    """The per-feature measures of one atlas (features that fired on the atlas tokens)."""
    atlas = Atlas(atlas_path)
    pages = [p for f in range(atlas.n_features) if (p := atlas.page(f)) is not None]
    f1 = detection_f1(
        sae,
        lm,
        cfg.hook,
        text,
        [rule_tokens(p.top) for p in pages],
        cfg.detect_tokens,
        int(atlas.meta["windows"]),
    )
    rows = []
    for f, p in enumerate(pages):
        if not p.top:
            continue
        rows.append(
            {
                "feature": f,
                "label": p.label,
                "label_confidence": p.label_confidence,
                "token_concentration": token_concentration(p.top),
                "detection_f1": None if np.isnan(f1[f]) else float(f1[f]),
                "density": p.density,
            }
        )
    return rows


# ------------------------------------------------------------------ the study
def run_study(cfg: MonosemanticityConfig, out: str | Path) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    lm = open_model(cfg.model, cfg.device)
    info = _lm_info(cfg.model)
    held_frac = cfg.heldout_fraction
    if held_frac is None:
        held_frac = info["config"]["heldout_fraction"] if info else 0.05
    text = build(TextConfig, corpus=cfg.corpus, context_length=cfg.context_length, device=cfg.device,
                 heldout_fraction=held_frac)
    common = {
        "model": cfg.model,
        "hooks": [cfg.hook],
        "corpus": cfg.corpus,
        "context_length": cfg.context_length,
        "heldout_fraction": held_frac,
        "progress": cfg.progress,
        "device": cfg.device,
    }

    _say(cfg, f"[1/5] harvesting {cfg.hook} of {cfg.model}")
    t = time.perf_counter()
    (train_store,) = harvest(
        build(HarvestConfig, **common, tokens=cfg.tokens, split="train"), out / "acts", lm
    )
    (held_store,) = harvest(
        build(HarvestConfig, **common, tokens=cfg.heldout_rows, split="heldout"), out / "acts-heldout", lm
    )
    timings["harvest"] = time.perf_counter() - t
    source, held = open_source(train_store), open_source(held_store)
    d = source.d_in

    _say(cfg, f"[2/5] training {len(cfg.architectures) * len(cfg.sizes)} dictionaries in one pass")
    t = time.perf_counter()
    # The base carries the L1 family's settings; k is an axis of one value, for the TopK cells.
    base = build(
        TrainConfig,
        architecture="relu",
        l1_coefficient=cfg.l1_coefficient,
        lr=cfg.lr,
        optimizer="adam",
        batch_size=cfg.batch_size,
        tokens=cfg.tokens,
        dead_after_tokens=cfg.dead_after_tokens,
        init_scale="balanced",
        seed=cfg.seed,
        device=cfg.device,
        progress=cfg.progress,
        model_name=cfg.model,
        hook_name=cfg.hook,
    )
    sweep = run_sweep(
        source,
        base,
        {"architecture": cfg.architectures, "expansion_factor": cfg.sizes,
         **({"k": [cfg.k]} if "topk" in cfg.architectures else {})},
        out / "sweep",
        eval_source=held,
        eval_rows=cfg.heldout_rows,
    )
    timings["sweep"] = time.perf_counter() - t
    dirs: dict[str, Path] = {}
    for r in sweep.rows:
        size = r["n_latents"] / d
        dirs[_name(r["architecture"], size)] = out / "sweep" / r["name"]

    _say(cfg, "[3/5] CE loss recovered, spliced into the model")
    t = time.perf_counter()
    rows = []
    for r in sweep.rows:
        name = _name(r["architecture"], r["n_latents"] / d)
        s, _ = saved_splice_eval(dirs[name], out / "splice" / f"{name}.json", lambda: lm, text,
                                 cfg.eval_tokens, cfg.hook, progress=cfg.progress)
        rows.append(
            {
                "dictionary": name,
                "architecture": r["architecture"],
                "size": r["n_latents"] / d,
                "n_latents": r["n_latents"],
                "fvu": r["fvu"],
                "l0": r["l0"],
                "dead_pct": 100 * r["dead_fraction"],
                "dense_pct": 100 * r["dense_fraction"],
                "ce_recovered_zero": s["ce_recovered"],
                "ce_recovered_mean": s["ce_recovered_mean"],
                "ce_clean": s["ce_clean"],
                "ce_spliced": s["ce_spliced"],
                "delta_ce": s["delta_ce"],
            }
        )
    timings["splice"] = time.perf_counter() - t
    atomic_write_csv(rows, out / "results.csv")
    atomic_write_text(out / "results.md", results_table(rows, cfg, source.n_rows))
    plot_sizes(rows, out / "sizes.png")

    _say(cfg, "[4/5] atlases: the neurons and the dictionaries compared and traced")
    t = time.perf_counter()
    neuron_dir = out / NEURONS
    if not (neuron_dir / "cfg.json").exists():
        identity_sae(d, cfg.model, cfg.hook).save(neuron_dir)
    atlas_cfg = build(
        AtlasConfig,
        corpus=cfg.corpus,
        context_length=cfg.context_length,
        heldout_fraction=held_frac,
        tokens=cfg.atlas_tokens,
        eval_tokens=0,
        device=cfg.device,
        progress=cfg.progress,
        cofire_tokens=16384,
    )
    atlases: dict[str, Path] = {}
    wanted = {NEURONS: neuron_dir, _name(cfg.compare_architecture, cfg.compare_size): None}
    wanted.update({_name(cfg.compare_architecture, s): None for s in cfg.family_sizes})
    for name in wanted:
        sae_dir = neuron_dir if name == NEURONS else dirs[name]
        path = out / "atlas" / f"{name}.atlas"
        metrics = next(
            (
                {k: v for k, v in r.items() if k not in ("dictionary", "architecture")}
                for r in rows
                if r["dictionary"] == name
            ),
            {"note": "the model's own neurons"},
        )
        build_atlas(sae_dir, atlas_cfg, path, lm=lm, metrics=metrics)  # reused when finished
        atlases[name] = path
    timings["atlases"] = time.perf_counter() - t

    t = time.perf_counter()
    compare = _name(cfg.compare_architecture, cfg.compare_size)
    measures = {}
    for name in (NEURONS, compare):
        cache = out / "interpretability" / f"{name}.json"
        sae_dir = neuron_dir if name == NEURONS else dirs[name]
        atlas_marker = stage.read_marker(atlases[name]) or {}
        settings = stage.Settings.of("interpretability", {
            "sae": stage.file_identity(sae_dir / WEIGHTS_FILENAME), "atlas": atlas_marker.get("fingerprint"),
            "detect_tokens": cfg.detect_tokens, "hook": cfg.hook, "text": text.model_dump()},
            free=("text.device", "text.batch_size"))
        if stage.finished(cache, settings) is None:
            sae = SAE.load(sae_dir).to(lm.device)
            atomic_write_json(cache, interpretability(atlases[name], sae, lm, cfg, text))
            stage.mark_finished(cache, settings)
        measures[name] = json.loads(cache.read_text())
    summary = compare_summary(measures[NEURONS], measures[compare])
    atomic_write_csv(
        [{"dictionary": name, **m} for name in (NEURONS, compare) for m in measures[name]],
        out / "interpretability.csv",
    )
    plot_interpretability(measures[NEURONS], measures[compare], compare, out / "neurons_vs_features.png")
    timings["interpretability"] = time.perf_counter() - t

    _say(
        cfg,
        "[5/5] feature splitting across "
        + ", ".join(_name(cfg.compare_architecture, s) for s in cfg.family_sizes),
    )
    t = time.perf_counter()
    names = [_name(cfg.compare_architecture, s) for s in sorted(cfg.family_sizes)]
    saes = {n: SAE.load(dirs[n]) for n in names}
    sample = next(held.rows(20_000, limit=20_000))
    traced = trace_families(saes, names, sample, cfg.min_cosine)
    labels = {n: _labels(atlases[n]) for n in names}
    atomic_write_json(out / "splits.json", [_family_json(f, names, labels) for f in traced[:50]])
    atomic_write_text(out / "splits.md", splits_markdown(traced[:8], names, atlases))
    # Every dictionary's atlas lists its features' closest relatives in the others.
    others_all = {n: SAE.load(dirs[n]) for n in dirs} | {NEURONS: SAE.load(neuron_dir)}
    for name, path in atlases.items():
        mine = others_all[name]
        rel = relatives(mine, {n: s for n, s in others_all.items() if n != name})
        add_relatives(
            path,
            rel,
            {n: str(atlases[n].resolve()) if n in atlases else None for n in others_all if n != name},
        )
    timings["splitting"] = time.perf_counter() - t

    result = {
        "config": cfg.model_dump(),
        "model_heldout_loss": info["heldout_loss"] if info else None,
        "heldout_fraction": held_frac,
        "d_in": d,
        "train_rows": source.n_rows,
        "results": rows,
        "neurons_vs_features": summary,
        "families": [_family_json(f, names, labels) for f in traced[:8]],
        "atlases": {n: str(p) for n, p in atlases.items()},
        "seconds": {
            **{k: round(v, 1) for k, v in timings.items()},
            "total": round(time.perf_counter() - t0, 1),
        },
    }
    atomic_write_json(out / "study.json", result)
    return result


def _lm_info(model: str) -> dict[str, Any] | None:
    """The lm.json of a model trained by `saelab lm train`, if it is one."""
    from saelab.models import resolve_model_folder

    info = resolve_model_folder(model) / "lm.json"
    return json.loads(info.read_text()) if info.exists() else None


def _labels(path: Path) -> dict[int, str]:
    atlas = Atlas(path)
    return atlas.labels(list(range(atlas.n_features)))


# ------------------------------------------------------------------ feature splitting
def trace_families(
    saes: dict[str, SAE], names: list[str], rows: torch.Tensor, min_cosine: float
) -> list[dict[str, Any]]:
    """Families of the smallest dictionary traced through each larger one: for every
    feature of names[0] with at least two descendants in names[1], its descendants there
    and, for each of those, theirs in names[2], and so on. Sorted by how cleanly the parent
    is its children (activation correlation of the parent with the children's sum)."""
    steps: list[dict[int, Family]] = []
    for small, large in itertools.pairwise(names):
        steps.append({f.parent: f for f in families(saes[small], saes[large], None, min_cosine, rows, top=6)})
    out = []
    for parent, fam in steps[0].items():
        tree: dict[str, Any] = {"feature": parent, "family": fam, "children": []}
        for child in fam.descendants:
            node: dict[str, Any] = {
                "feature": child.feature,
                "cosine": child.cosine,
                "correlation": child.correlation,
                "children": [],
            }
            if len(steps) > 1 and child.feature in steps[1]:
                node["children"] = [
                    {"feature": g.feature, "cosine": g.cosine, "correlation": g.correlation}
                    for g in steps[1][child.feature].descendants
                ]
            tree["children"].append(node)
        out.append(tree)
    out.sort(key=lambda t: (-(t["family"].family_correlation or 0), t["feature"]))
    return out


def _family_json(tree: dict[str, Any], names: list[str], labels: dict[str, dict[int, str]]) -> dict[str, Any]:
    fam: Family = tree["family"]

    def node(n: dict[str, Any], level: int) -> dict[str, Any]:
        return {
            "dictionary": names[level],
            "feature": n["feature"],
            "label": labels[names[level]].get(n["feature"]),
            "cosine": n.get("cosine"),
            "correlation": n.get("correlation"),
            "children": [node(c, level + 1) for c in n.get("children", [])],
        }

    return {
        "dictionary": names[0],
        "feature": fam.parent,
        "label": labels[names[0]].get(fam.parent),
        "family_cosine": fam.family_cosine,
        "family_correlation": fam.family_correlation,
        "children": [node(c, 1) for c in tree["children"]],
    }


def _example_text(atlas: Atlas, feature: int, n: int = 2, before: int = 10) -> list[str]:
    page = atlas.page(feature)
    if page is None:
        return []
    out = []
    for e in page.top[:n]:
        toks = [page.vocab.get(str(i), "?") for i in e.t]
        p = e.peak
        left = "".join(show_token(t) for t in toks[max(0, p - before) : p])
        right = "".join(show_token(t) for t in toks[p + 1 : p + 4])
        out.append(f"{left}[[{show_token(toks[p])}]]{right}".replace("|", "\\|"))
    return out


def splits_markdown(trees: list[dict[str, Any]], names: list[str], atlases: dict[str, Path]) -> str:
    books = {n: Atlas(atlases[n]) for n in names}
    lines = [
        "# Feature families across " + ", ".join(names),
        "",
        "Each family: a feature of the smallest dictionary, its descendants in the next "
        "(decoder cosine ≥ the floor; cos = decoder cosine, r = activation correlation with the "
        "parent over 20,000 held-out tokens) and theirs in the next. The peak token of each top "
        "example is in [[ ]].",
        "",
    ]
    def node(n: dict[str, Any], level: int, head: str) -> None:
        name, f, book = names[level], n["feature"], books[names[level]]
        pad = "    " * (level - 1) + "  " if level else ""
        lines.append(f"{pad}{'- ' if level else '## '}{name} #{f} {book.labels([f]).get(f)} ({head})")
        bullet = f"{pad}{'  ' if level else ''}- "
        lines.extend(f"{bullet}`{t}`" for t in _example_text(book, f, 1 if level else 2))
        for c in n.get("children", []):
            node(c, level + 1, f"cos {c['cosine']:.2f}, r {c['correlation'] or 0:.2f}")

    for tree in trees:
        fam: Family = tree["family"]
        node(tree, 0, f"family cos {fam.family_cosine:.2f}, r {fam.family_correlation or 0:.2f}")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------ tables and plots
def results_table(rows: list[dict[str, Any]], cfg: MonosemanticityConfig, train_rows: int) -> str:
    lines = [
        f"Dictionaries over `{cfg.hook}` of `{cfg.model}` ({train_rows:,} training rows each; FVU, L0, "
        f"dead and dense on {cfg.heldout_rows:,} held-out rows; CE loss recovered on {cfg.eval_tokens:,} "
        "held-out tokens).",
        "",
        "| dictionary | latents | FVU | L0 | dead | dense | CE recovered (zero, every position) "
        "| CE recovered (mean) | ΔCE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dictionary']} | {r['n_latents']:,} | {r['fvu']:.3f} | {r['l0']:.1f} | "
            f"{r['dead_pct']:.1f}% | {r['dense_pct']:.1f}% | {r['ce_recovered_zero']:.3f} | "
            f"{r['ce_recovered_mean']:.3f} | {r['delta_ce']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_sizes(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("fvu", "FVU"),
        ("l0", "L0"),
        ("dead_pct", "dead latents (%)"),
        ("dense_pct", "dense latents (%)"),
        ("ce_recovered_zero", "CE recovered (zero abl., every position)"),
        ("ce_recovered_mean", "CE recovered (mean abl.)"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4))
    for ax, (key, title) in zip(axes.flat, keys, strict=True):
        for arch in sorted({r["architecture"] for r in rows}):
            rs = sorted((r for r in rows if r["architecture"] == arch), key=lambda r: r["size"])
            ax.plot(
                [r["size"] for r in rs], [r[key] for r in rs], "o-" if arch == "topk" else "s--", label=arch
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dictionary size (x neurons)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)


def compare_summary(neurons: list[dict[str, Any]], features: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
        v = np.array([r[key] for r in rows if r[key] is not None], dtype=np.float64)
        return {"median": float(np.median(v)), "mean": float(v.mean()), "n": len(v)} if len(v) else {}

    keys = ("label_confidence", "token_concentration", "detection_f1", "density")
    return {
        "neurons": {k: stats(neurons, k) for k in keys},
        "features": {k: stats(features, k) for k in keys},
    }


def plot_interpretability(
    neurons: list[dict[str, Any]], features: list[dict[str, Any]], name: str, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("label_confidence", "label confidence\n(share of top examples on the label token)"),
        ("token_concentration", "token concentration of top examples\n(1 − normalised entropy)"),
        ("detection_f1", "token-rule detection F1\n(fresh held-out tokens)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    bins = np.linspace(0, 1, 21)
    for ax, (key, title) in zip(axes, keys, strict=True):
        for rows, label, colour in (
            (neurons, f"neurons ({len(neurons)})", "C1"),
            (features, f"{name} features ({len(features)})", "C0"),
        ):
            v = [r[key] for r in rows if r[key] is not None]
            ax.hist(v, bins=bins, density=True, alpha=0.55, color=colour, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("density of features")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)


__all__ = ["MonosemanticityConfig", "identity_sae", "run_study", "token_concentration", "trace_families"]
