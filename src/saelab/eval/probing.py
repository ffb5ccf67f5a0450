"""Sparse probing (SAEBench; Gurnee et al. 2023): can a handful of an SAE's latents tell the
classes of a binary task apart as well as the whole activation can?

For each task of :mod:`saelab.eval.tasks`, the model reads each example and the SAE encodes the
activations at its hook. A passage's features are the mean over its tokens (BOS excluded) of
the activation and of each latent; a token's are its own. Examples are split 80/20 with a fixed
seed (stratified). On the training split the ``k`` latents whose mean differs most between the
classes are picked (``k`` in 1, 2, 5, 20), a logistic regression is fitted on them (features
standardised, L2, scikit-learn's ``lbfgs``), and its accuracy on the test split is the score.
The baseline is the same regression on the whole activation at the hook. Chance is 0.5 (the
tasks are balanced).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.activations.hooks import run_hooked
from saelab.errors import InputError
from saelab.eval.tasks import TOKEN_CATEGORY, TOKEN_TASKS, WINDOW_TASKS, code_texts, window_tasks
from saelab.models import LoadedModel
from saelab.sae.base import SAE, check_sae_fits

KS = (1, 2, 5, 20)


@dataclass
class ProbeSettings:
    per_class: int = 200  # examples of each label per task
    context_length: int = 128
    batch_size: int = 16
    code_passages: int = 200  # Python passages (about 400 characters each) the token tasks draw from
    test_fraction: float = 0.2
    ks: tuple[int, ...] = KS
    tasks: tuple[str, ...] = WINDOW_TASKS + TOKEN_TASKS
    seed: int = 0


Window = tuple[list[int], list[tuple[int, int]]]


def _windows(lm: LoadedModel, texts: list[str], context_length: int) -> list[Window]:
    """Token ids (BOS first, at most ``context_length``) and character offsets of each text."""
    bos = lm.window_format().bos_id
    out = []
    for text in texts:
        enc = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        room = context_length - (bos is not None)
        ids, offsets = list(enc["input_ids"])[:room], [tuple(o) for o in enc["offset_mapping"]][:room]
        out.append(([bos, *ids], [(0, 0), *offsets]) if bos is not None else (ids, offsets))
    return out


@torch.no_grad()
def _activations(lm: LoadedModel, sae: SAE, hook: str, windows: list[list[int]], batch_size: int,
                 pick: list[list[int]] | None, desc: str, progress: bool) -> tuple[Tensor, Tensor]:
    """Features of each window: mean-pooled over its tokens after BOS ([n, d], [n, N]) or, with
    ``pick`` (token positions per window), those tokens' own ([Σ picks, d], [Σ picks, N])."""
    xs, zs = [], []
    dev = lm.device
    pad = lm.window_format().pad_id
    skip_first = lm.window_format().bos_id is not None
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", dynamic_ncols=True,
                  disable=not progress, leave=False):
        chunk = windows[i:i + batch_size]
        width = max(len(w) for w in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, w in enumerate(chunk):
            ids[j, :len(w)] = torch.tensor(w)
            attn[j, :len(w)] = 1
        cap, _ = run_hooked(lm.model, ids.to(dev), attn.to(dev), capture=[hook])
        acts = cap[hook].to(sae.W_dec.dtype)
        for j, w in enumerate(chunk):
            if pick is not None:
                rows = acts[j, pick[i + j]]
                if rows.shape[0]:
                    xs.append(rows.float().cpu())
                    zs.append(sae.encode(rows).float().cpu())
                continue
            rows = acts[j, int(skip_first):len(w)]
            xs.append(rows.float().mean(0, keepdim=True).cpu())
            zs.append(sae.encode(rows).float().mean(0, keepdim=True).cpu())
    return torch.cat(xs), torch.cat(zs)


def _split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test index split."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.concatenate(train), np.concatenate(test)


def _fit_score(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(train_x, train_y)
    return float(model.score(test_x, test_y))


@dataclass
class TaskResult:
    task: str
    level: str
    n_train: int
    n_test: int
    baseline_accuracy: float  # logistic regression on the whole activation
    accuracy: dict[str, float]  # "k=1" -> test accuracy on the k latents picked
    latents: dict[str, list[int]]  # "k=1" -> which


def probe(x: Tensor, z: Tensor, labels: np.ndarray, ks: tuple[int, ...], test_fraction: float,
          seed: int, task: str, level: str) -> TaskResult:
    """The baseline and the k-sparse probes of one task's features."""
    train, test = _split(labels, test_fraction, seed)
    xn, zn = x.numpy().astype(np.float64), z.numpy().astype(np.float64)
    baseline = _fit_score(xn[train], labels[train], xn[test], labels[test])
    diff = np.abs(zn[train][labels[train] == 1].mean(0) - zn[train][labels[train] == 0].mean(0))
    order = np.argsort(-diff, kind="stable")
    acc, picked = {}, {}
    for k in ks:
        idx = order[: min(k, zn.shape[1])]
        acc[f"k={k}"] = _fit_score(zn[train][:, idx], labels[train], zn[test][:, idx], labels[test])
        picked[f"k={k}"] = [int(i) for i in idx]
    return TaskResult(task, level, len(train), len(test), baseline, acc, picked)


def sparse_probing(sae: SAE, lm: LoadedModel, hook: str | None = None, settings: ProbeSettings | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Sparse probing of ``sae`` on every task of ``settings.tasks``; the figures as a dict
    (per task and their means)."""
    cfg = settings or ProbeSettings()
    hook = hook or sae.cfg.hook_name
    if not hook:
        raise InputError("the SAE's cfg.json names no hook point; pass --hook")
    unknown = sorted(set(cfg.tasks) - set(WINDOW_TASKS) - set(TOKEN_TASKS))
    if unknown:
        raise InputError(f"unknown probing task(s) {', '.join(unknown)}; the tasks are "
                         f"{', '.join(WINDOW_TASKS + TOKEN_TASKS)}")
    check_sae_fits(sae, lm, hook)
    sae = sae.to(lm.device).eval()
    results: list[TaskResult] = []
    names = tuple(t for t in cfg.tasks if t in WINDOW_TASKS)
    for task in window_tasks(cfg.per_class, seed=cfg.seed, names=names):
        wins = [ids for ids, _ in _windows(lm, task.positives + task.negatives, cfg.context_length)]
        x, z = _activations(lm, sae, hook, wins, cfg.batch_size, None, task.name, progress)
        labels = np.array([1] * len(task.positives) + [0] * len(task.negatives))
        results.append(probe(x, z, labels, cfg.ks, cfg.test_fraction, cfg.seed, task.name, "window"))
    token_names = [t for t in cfg.tasks if t in TOKEN_TASKS]
    if token_names:
        results += _token_tasks(sae, lm, hook, cfg, token_names, progress)
    mean = {"baseline_accuracy": float(np.mean([r.baseline_accuracy for r in results]))}
    for k in cfg.ks:
        mean[f"k={k}"] = float(np.mean([r.accuracy[f"k={k}"] for r in results]))
    return {"settings": {**asdict(cfg), "hook": hook}, "mean": mean,
            "tasks": {r.task: asdict(r) for r in results}}


def _token_tasks(sae: SAE, lm: LoadedModel, hook: str, cfg: ProbeSettings, names: list[str],
                 progress: bool) -> list[TaskResult]:
    """The token tasks: label every model token of the Python passages, draw each task's balanced
    sample, run the model once over the passages and read the drawn tokens."""
    texts = code_texts(cfg.code_passages, seed=cfg.seed)
    wins = _windows(lm, [t for t, _ in texts], cfg.context_length)
    cats: list[tuple[int, int, str]] = []  # (window, position, category or "")
    for w, ((_, offsets), (text, spans)) in enumerate(zip(wins, texts, strict=True)):
        starts = sorted(spans)
        for pos, (a, b) in enumerate(offsets):
            if pos == 0 and lm.window_format().bos_id is not None:
                continue
            first = next((c for c in range(a, b) if not text[c].isspace()), None)
            cat = ""
            if first is not None:
                cat = next((c for s, e, c in starts if s <= first < e), "")
            cats.append((w, pos, cat))
    rng = random.Random(cfg.seed)
    samples: dict[str, tuple[list[int], np.ndarray]] = {}
    for name in names:
        want = TOKEN_CATEGORY[name]
        pos = [i for i, c in enumerate(cats) if c[2] == want]
        neg = [i for i, c in enumerate(cats) if c[2] != want]
        n = min(cfg.per_class, len(pos), len(neg))
        chosen = rng.sample(pos, n) + rng.sample(neg, n)
        samples[name] = (chosen, np.array([1] * n + [0] * n))
    used = sorted({i for chosen, _ in samples.values() for i in chosen})
    row = {i: r for r, i in enumerate(used)}
    pick: list[list[int]] = [[] for _ in wins]
    for i in used:
        pick[cats[i][0]].append(cats[i][1])
    # the tokens come back window by window, in position order: the order of ``used``
    x, z = _activations(lm, sae, hook, [ids for ids, _ in wins], cfg.batch_size, pick, "python tokens",
                        progress)
    out = []
    for name in names:
        chosen, labels = samples[name]
        rows = [row[i] for i in chosen]
        out.append(probe(x[rows], z[rows], labels, cfg.ks, cfg.test_fraction, cfg.seed, name, "token"))
    return out
