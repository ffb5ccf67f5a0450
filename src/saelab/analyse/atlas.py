"""Build a feature atlas: every feature's statistics and examples, in one streaming pass.

Held-out windows of the corpus run through the model up to the SAE's hook; the SAE encodes
every content token; per feature the pass keeps

- its firing count, activation sum and maximum, and a histogram of its activations over
  log-spaced bins shared by all features;
- the top-activating windows (one candidate per window, so a window counts once; identical
  contexts are dropped at the end), each with the feature's activation on every token of
  the context around the peak;
- a uniform sample of its firings (bottom-k of random keys, so it streams), later sorted
  into activation quantile bands so weak firings are seen too; half the sample is shown,
  half is held out to score explanations;
- which features fire on the same tokens (on the first ``cofire_tokens`` tokens).

Memory is set by features x examples kept, not by the number of tokens: the window tokens
go to a file, not to memory. Every ``checkpoint_every`` seconds the state is saved beside
the output, so a killed build re-run with the same arguments resumes.

At the end come the logit effects (decoder directions through the final norm's scale and
the unembedding), nearest features by decoder cosine, co-firing by Jaccard index, labels,
optional explanations, splice metrics for the global page, and the SQLite file
(:mod:`saelab.analyse.atlasdb`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saelab import __version__
from saelab.activations.hooks import residual_directions, run_hooked, unembedding
from saelab.analyse.atlasdb import ATLAS_FORMAT_VERSION, AtlasWriter, pack_page
from saelab.analyse.explain import Explainer, auto_label
from saelab.config import AtlasConfig, TextConfig
from saelab.data.text import text_batches
from saelab.errors import InputError
from saelab.eval.splice import splice_eval
from saelab.io import atomic_torch_save
from saelab.models import LoadedModel, open_model
from saelab.sae.base import SAE, WEIGHTS_FILENAME, check_sae_fits

HIST_LOG10 = (-3.0, 3.0, 48)  # activation histogram: 48 log-spaced bins from 1e-3 to 1e3
DENSITY_LOG10 = (-7.0, 0.0, 28)  # global histogram of log10 feature density
MAX_CHUNK_ELEMENTS = 1 << 25  # latents encoded at once (tokens x features): 128 MiB float32


@dataclass
class _State:
    """What the streaming pass accumulates (all of it saved for resume)."""

    windows: int
    tokens: int
    count: Tensor  # [F] int64
    act_sum: Tensor  # [F] float64
    act_max: Tensor  # [F] float32
    hist: Tensor  # [F, bins] int64
    top_val: Tensor  # [F, Kc] float32, -inf = empty
    top_win: Tensor  # [F, Kc] int64
    top_pos: Tensor  # [F, Kc] int64
    top_ctx: Tensor  # [F, Kc, C] float16
    res_key: Tensor  # [F, R] float32, +inf = empty
    res_val: Tensor
    res_win: Tensor
    res_pos: Tensor
    res_ctx: Tensor
    co_tok: Tensor  # [n] int64 token ids (window * T + position) of sampled firings
    co_feat: Tensor  # [n] int64
    co_tokens: int
    rng: Tensor

    @classmethod
    def empty(cls, n: int, kc: int, r: int, c: int, device: torch.device, seed: int) -> _State:
        def full(shape: tuple[int, ...], v: float, dtype: torch.dtype) -> Tensor:
            return torch.full(shape, v, dtype=dtype, device=device)

        g = torch.Generator(device=device)
        g.manual_seed(seed)
        i64 = torch.int64
        return cls(
            windows=0,
            tokens=0,
            count=full((n,), 0, i64),
            act_sum=full((n,), 0, torch.float64),
            act_max=full((n,), 0, torch.float32),
            hist=full((n, HIST_LOG10[2]), 0, i64),
            top_val=full((n, kc), -math.inf, torch.float32),
            top_win=full((n, kc), -1, i64),
            top_pos=full((n, kc), 0, i64),
            top_ctx=full((n, kc, c), 0, torch.float16),
            res_key=full((n, r), math.inf, torch.float32),
            res_val=full((n, r), 0, torch.float32),
            res_win=full((n, r), -1, i64),
            res_pos=full((n, r), 0, i64),
            res_ctx=full((n, r, c), 0, torch.float16),
            co_tok=full((0,), 0, i64),
            co_feat=full((0,), 0, i64),
            co_tokens=0,
            rng=g.get_state(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name).cpu()
            if isinstance(getattr(self, f.name), Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device) -> _State:
        return cls(**{k: v.to(device) if isinstance(v, Tensor) and k != "rng" else v for k, v in d.items()})


class _Pass:
    """The per-chunk update of :class:`_State`."""

    def __init__(self, cfg: AtlasConfig, state: _State, context_length: int, device: torch.device) -> None:
        self.cfg, self.s, self.T = cfg, state, context_length
        self.C = cfg.before + cfg.after + 1
        self.ar = torch.arange(self.C, device=device)
        self.g = torch.Generator(device=device)
        self.g.set_state(state.rng)
        lo, hi, nb = HIST_LOG10
        self.hist_scale = nb / (hi - lo)

    def _ctx(self, zp: Tensor, w: Tensor, p: Tensor, f: Tensor) -> Tensor:
        """Feature f's activations on the C tokens around (window w, position p): [n, C]."""
        return zp[w[:, None], p[:, None] + self.ar, f[:, None]].half()

    def update(self, z: Tensor, win0: int, n_tokens: int) -> None:
        """Add latents z [b, T, F] (zero at non-content positions, of which there are
        ``n_tokens``) of windows win0, win0+1, …"""
        s, cfg = self.s, self.cfg
        _, T, n = z.shape
        dev = z.device
        zp = F.pad(z, (0, 0, cfg.before, cfg.after))  # pad the positions: context never runs off
        fired = z > 0
        s.count += fired.sum((0, 1))
        s.act_sum += z.sum((0, 1), dtype=torch.float64)
        s.act_max = torch.maximum(s.act_max, z.amax((0, 1)))
        w_i, t_i, f_i = fired.nonzero(as_tuple=True)
        vals = z[w_i, t_i, f_i]
        lo, _, nb = HIST_LOG10
        bins = ((vals.log10() - lo) * self.hist_scale).floor().clamp(0, nb - 1).long()
        s.hist += torch.bincount(f_i * nb + bins, minlength=n * nb).view(n, nb)

        # Top windows: each window's peak per feature is one candidate. Entries stay in their
        # slots (sorted only at the end), so only the slots that change are written.
        wmax, wpos = z.max(dim=1)  # [b, F]
        cand = torch.where(wmax > 0, wmax, -math.inf).t()  # [F, b]
        f, slot, j = _merge(s.top_val, cand, largest=True)
        if f.numel():
            s.top_val[f, slot] = cand[f, j]
            s.top_win[f, slot] = j + win0
            s.top_pos[f, slot] = wpos[j, f]
            s.top_ctx[f, slot] = self._ctx(zp, j, wpos[j, f], f)

        # Uniform sample of firings: the R smallest random keys per feature.
        r = s.res_key.shape[1]
        keys = torch.rand(vals.shape, generator=self.g, device=dev)
        order = torch.argsort(f_i.double() + keys.double())
        f_s = f_i[order]
        per = torch.bincount(f_i, minlength=n)
        rank = torch.arange(len(order), device=dev) - (torch.cumsum(per, 0) - per)[f_s]
        ok = rank < r
        o, fk, rk = order[ok], f_s[ok], rank[ok]
        nk = torch.full((n, r), math.inf, device=dev)
        nk[fk, rk] = keys[o]
        nv = torch.zeros((n, r), device=dev)
        nw = torch.zeros((n, r), dtype=torch.long, device=dev)
        npos = torch.zeros((n, r), dtype=torch.long, device=dev)
        nv[fk, rk], nw[fk, rk], npos[fk, rk] = vals[o], w_i[o], t_i[o]
        f, slot, j = _merge(s.res_key, nk, largest=False)
        if f.numel():
            s.res_key[f, slot] = nk[f, j]
            s.res_val[f, slot] = nv[f, j]
            s.res_win[f, slot] = nw[f, j] + win0
            s.res_pos[f, slot] = npos[f, j]
            s.res_ctx[f, slot] = self._ctx(zp, nw[f, j], npos[f, j], f)
        s.rng = self.g.get_state()

        if s.co_tokens < cfg.cofire_tokens:
            s.co_tok = torch.cat([s.co_tok, (w_i + win0) * T + t_i])
            s.co_feat = torch.cat([s.co_feat, f_i])
            s.co_tokens += n_tokens


def _merge(old: Tensor, new: Tensor, largest: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, keep the K best of ``old`` [F, K] and ``new`` [F, b] (largest or smallest;
    ±inf = empty). Returns (row, old slot, new column) for each new entry that takes the slot
    of an old one it displaces; old entries that stay keep their slots."""
    k = old.shape[1]
    _, idx = torch.cat([old, new], 1).topk(k, dim=1, largest=largest)
    chosen = torch.zeros(old.shape[0], k + new.shape[1], dtype=torch.bool, device=old.device)
    chosen.scatter_(1, idx, True)
    # Each row chose K entries, so it drops as many old ones as it takes new ones; nonzero()
    # lists both row by row, so they pair up.
    _, slot = (~chosen[:, :k]).nonzero(as_tuple=True)
    f, j = chosen[:, k:].nonzero(as_tuple=True)
    real = torch.isfinite(new[f, j])  # an empty new entry only ever displaces an empty slot
    return f[real], slot[real], j[real]


def _fingerprint(sae_dir: Path, model: str, hook: str, cfg: AtlasConfig) -> str:
    w = sae_dir / WEIGHTS_FILENAME
    st = w.stat()
    keep = cfg.model_dump(
        exclude={
            "tokens",
            "progress",
            "checkpoint_every",
            "explainer_url",
            "explainer_model",
            "explain_features",
            "eval_tokens",
            "device",
        }
    )
    blob = json.dumps([str(w.resolve()), st.st_size, st.st_mtime_ns, model, hook, keep], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def vocab_texts(tokenizer: Any) -> list[str]:
    """Each token id as the text it decodes to on its own."""
    n = len(tokenizer)
    return [tokenizer.decode([i]) for i in range(n)]


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def _nearest(sae: SAE, k: int) -> tuple[Tensor, Tensor]:
    w = F.normalize(sae.W_dec.detach().float(), dim=1)
    n = w.shape[0]
    k = min(k, n - 1)
    vals, idx = [], []
    for a, b in _chunks(n, 1024):
        sim = w[a:b] @ w.T
        sim[torch.arange(b - a), torch.arange(a, b)] = -2.0
        v, i = sim.topk(k, dim=1)
        vals.append(v.cpu())
        idx.append(i.cpu())
    return torch.cat(vals), torch.cat(idx)


@torch.no_grad()
def _cofiring(co_tok: Tensor, co_feat: Tensor, n: int, k: int) -> tuple[Tensor, Tensor]:
    """Top-k Jaccard index of firing sets on the sampled tokens: ([n, k] values, [n, k] ids)."""
    k = min(k, n - 1)
    if co_tok.numel() == 0:
        return torch.zeros(n, k), torch.zeros(n, k, dtype=torch.long)
    tok, feat = co_tok.cpu(), co_feat.cpu()
    _, rows = torch.unique(tok, return_inverse=True)
    s = int(rows.max()) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        z = torch.sparse_coo_tensor(
            torch.stack([feat, rows]), torch.ones(len(feat)), (n, s), check_invariants=False
        ).coalesce()
        zc = z.to_sparse_csr()
    counts = torch.bincount(feat, minlength=n).float()
    vals, idx = [], []
    for a, b in _chunks(n, 256):
        block = torch.zeros(s, b - a)
        sel = (feat >= a) & (feat < b)
        block[rows[sel], feat[sel] - a] = 1.0
        inter = (zc @ block).T  # [chunk, n]
        jac = inter / (counts[a:b, None] + counts[None, :] - inter).clamp_min(1)
        jac[torch.arange(b - a), torch.arange(a, b)] = -1.0
        v, i = jac.topk(k, dim=1)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


@torch.no_grad()
def _logit_effects(sae: SAE, lm: LoadedModel, hook: str,
                   k: int) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Each feature's direct effect on the logits: its decoder direction, written into the
    residual stream (through the MLP's output weights for an MLP-neuron hook), through the
    final norm's scale and the unembedding."""
    ue = unembedding(lm.model) if lm.causal else None
    if ue is None:
        return None
    w_u, scale = ue
    w_u = w_u.float().to(sae.device)
    # what a latent writes: at the hook it reads, or a transcoder's output hook
    dirs = residual_directions(lm.model, sae.cfg.hook_name_out or hook, sae.W_dec.detach().float())
    if scale is not None:
        dirs = dirs * scale.float().to(dirs.device)
    out: list[list[Tensor]] = [[], [], [], []]
    for a, b in _chunks(dirs.shape[0], 512):
        logits = dirs[a:b] @ w_u.T
        pv, pi = logits.topk(k, dim=1)
        nv, ni = logits.topk(k, dim=1, largest=False)
        for lst, t in zip(out, (pv, pi, nv, ni), strict=True):
            lst.append(t.cpu())
    pv, pi, nv, ni = (torch.cat(x) for x in out)
    return pv, pi, nv, ni


def _density_hist(density: np.ndarray) -> dict[str, Any]:
    lo, hi, nb = DENSITY_LOG10
    alive = density[density > 0]
    counts, _ = np.histogram(np.log10(np.clip(alive, 10**lo, 1.0)), bins=nb, range=(lo, hi))
    return {"lo": lo, "hi": hi, "counts": counts.tolist(), "dead": int((density == 0).sum())}


def _pairs(ids: Tensor, values: Tensor) -> list[list]:
    """[[id, value], ...] for a page, values to 4 decimals."""
    return [[int(i), round(float(v), 4)] for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def _round(xs: np.ndarray) -> list[float]:
    return [float(f"{x:.4g}") if x else 0 for x in xs.tolist()]


class _Examples:
    """Turns kept (window, position) candidates into token contexts, deduplicated."""

    def __init__(self, windows: np.ndarray, before: int, after: int) -> None:
        pad = np.full((windows.shape[0], before + after), -1, dtype=np.int32)
        self.w = np.concatenate([pad[:, :before], windows, pad[:, before:]], axis=1)
        self.C = before + after + 1
        self.before = before

    def context(self, win: int, pos: int, acts: np.ndarray) -> tuple[list[int], list[float], int]:
        ids = self.w[win, pos : pos + self.C]
        real = ids >= 0
        peak = int(real[: self.before].sum())
        return ids[real].tolist(), _round(acts[real].astype(np.float32)), peak


@dataclass
class AtlasResult:
    path: Path
    tokens: int
    features: int
    seconds: float
    tokens_per_s: float | None  # of the streaming pass; None when it was all resumed


@torch.no_grad()
def build_atlas(
    sae_dir: str | Path,
    cfg: AtlasConfig,
    out: str | Path,
    lm: LoadedModel | None = None,
    metrics: dict[str, Any] | None = None,
) -> AtlasResult:
    """Build the atlas of the SAE in ``sae_dir`` into the SQLite file ``out``. ``metrics``:
    splice-evaluation figures already measured (else ``cfg.eval_tokens`` are evaluated)."""
    t_start = time.perf_counter()
    sae_dir, out = Path(sae_dir), Path(out)
    sae = SAE.load(sae_dir)
    model = cfg.model or sae.cfg.model_name
    hook = cfg.hook or sae.cfg.hook_name
    if not model or not hook:
        raise InputError(
            f"{sae_dir}/cfg.json names no {'model' if not model else 'hook'}; pass "
            f"--{'model' if not model else 'hook'}"
        )
    if sae.cfg.hook_name and hook != sae.cfg.hook_name:
        raise InputError(f"the SAE in {sae_dir} was trained on {sae.cfg.hook_name}, not {hook}")
    lm = lm or open_model(model, cfg.device)
    check_sae_fits(sae, lm, hook)
    dev = lm.device
    sae = sae.to(dev).eval()
    n, T = sae.n_latents, cfg.context_length
    kc, r, c = 2 * cfg.top_examples, 2 * cfg.bands * cfg.band_examples, cfg.before + cfg.after + 1

    partial = out.with_name(out.name + ".partial")
    fp = _fingerprint(sae_dir, model, hook, cfg)
    state_file, windows_file = partial / "state.pt", partial / "windows.bin"
    state = None
    if state_file.is_file():
        saved = torch.load(state_file, weights_only=False)
        if saved.get("fingerprint") == fp:
            state = _State.from_dict(saved["state"], dev)
        else:
            print(f"{partial}: left by a build with other settings; starting over", file=sys.stderr)
    if state is None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        state = _State.empty(n, kc, r, c, dev, cfg.seed)
    with open(windows_file, "ab") as f:  # keep exactly the windows the state has seen
        f.truncate(state.windows * T * 4)

    step = _Pass(cfg, state, T, dev)
    chunk_windows = max(1, MAX_CHUNK_ELEMENTS // (T * n))
    bar = tqdm(
        total=cfg.tokens,
        initial=min(state.tokens, cfg.tokens),
        unit="tok",
        unit_scale=True,
        desc="atlas",
        dynamic_ncols=True,
        disable=not cfg.progress,
    )
    last_save = time.perf_counter()
    t_pass = time.perf_counter()
    tokens_at_start = state.tokens

    def save() -> None:
        atomic_torch_save({"fingerprint": fp, "state": state.to_dict()}, state_file)

    batches = text_batches(lm, cfg, "heldout", skip_windows=state.windows)
    with open(windows_file, "ab") as wf:
        for batch in batches:
            if state.tokens >= cfg.tokens:
                break
            per_window = batch.content_mask.sum(1).cumsum(0)
            need = cfg.tokens - state.tokens
            if int(per_window[-1]) > need:
                batch = batch.take(int(torch.searchsorted(per_window, need)) + 1)
            ids, attn = batch.input_ids.to(dev), batch.attention_mask.to(dev)
            cap, _ = run_hooked(lm.model, ids, attn, capture=[hook])
            x = cap[hook].float()
            mask = batch.content_mask.to(dev)
            for a, b in _chunks(ids.shape[0], chunk_windows):
                z = sae.encode(x[a:b].reshape(-1, sae.d_in)).reshape(b - a, T, n).float()
                z = z * mask[a:b, :, None]
                step.update(z, state.windows + a, int(mask[a:b].sum()))
            toks = batch.input_ids.to(torch.int32).masked_fill(batch.attention_mask == 0, -1)
            wf.write(toks.numpy().tobytes())
            state.windows += ids.shape[0]
            got = int(batch.n_content)
            state.tokens += got
            bar.update(got)
            if time.perf_counter() - last_save > cfg.checkpoint_every:
                wf.flush()
                save()
                last_save = time.perf_counter()
    bar.close()
    pass_seconds = time.perf_counter() - t_pass
    if state.tokens == 0:
        raise InputError(f"corpus {cfg.corpus!r} has no held-out documents to build an atlas from")
    save()
    pass_tokens = state.tokens - tokens_at_start

    metrics = dict(metrics or {})
    if not metrics and cfg.eval_tokens:
        text = TextConfig(**cfg.model_dump(include=set(TextConfig.model_fields)))
        metrics = splice_eval(
            sae, lm, text, tokens=cfg.eval_tokens, hook=hook, progress=cfg.progress
        ).as_dict()
    path = _finish(sae_dir, sae, lm, model, hook, cfg, state, windows_file, out, metrics)
    shutil.rmtree(partial, ignore_errors=True)
    seconds = time.perf_counter() - t_start
    return AtlasResult(
        path=path,
        tokens=state.tokens,
        features=n,
        seconds=seconds,
        tokens_per_s=pass_tokens / pass_seconds if pass_tokens else None,
    )


def _finish(
    sae_dir: Path,
    sae: SAE,
    lm: LoadedModel,
    model: str,
    hook: str,
    cfg: AtlasConfig,
    s: _State,
    windows_file: Path,
    out: Path,
    metrics: dict[str, Any],
) -> Path:
    n, T = sae.n_latents, cfg.context_length
    progress = cfg.progress
    say = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)
    say("atlas: nearest features, co-firing, logit effects ...")
    count = s.count.cpu().numpy()
    density = count / s.tokens
    mean_act = (s.act_sum.cpu().numpy() / np.maximum(count, 1)).astype(np.float32)
    max_act = s.act_max.cpu().numpy()
    hist = s.hist.cpu().numpy()
    near_v, near_i = _nearest(sae, cfg.neighbours)
    co_v, co_i = _cofiring(s.co_tok, s.co_feat, n, cfg.neighbours)
    logits = _logit_effects(sae, lm, hook, cfg.logit_tokens)
    vocab = vocab_texts(lm.tokenizer)
    windows = np.fromfile(windows_file, dtype=np.int32).reshape(-1, T)
    ex = _Examples(windows, cfg.before, cfg.after)

    # Slots are unordered during the pass: top examples strongest first, the sample by key.
    o = torch.argsort(s.top_val, dim=1, descending=True, stable=True)
    top_val, top_win, top_pos = (t.gather(1, o).cpu().numpy() for t in (s.top_val, s.top_win, s.top_pos))
    top_ctx = s.top_ctx.gather(1, o[..., None].expand(-1, -1, s.top_ctx.shape[2])).cpu().numpy()
    o = torch.argsort(s.res_key, dim=1, stable=True)
    res_key, res_val, res_win, res_pos = (
        t.gather(1, o).cpu().numpy() for t in (s.res_key, s.res_val, s.res_win, s.res_pos)
    )
    res_ctx = s.res_ctx.gather(1, o[..., None].expand(-1, -1, s.res_ctx.shape[2])).cpu().numpy()
    shown = cfg.bands * cfg.band_examples

    tops: list[list[tuple[list[int], list[float], int, float]]] = []
    bands: list[list[dict[str, Any]]] = []
    heldout: list[list[tuple[list[int], list[float], int, float]]] = []
    labels: list[tuple[str, float]] = []
    for f in tqdm(range(n), desc="atlas examples", unit="feature", dynamic_ncols=True, disable=not progress):
        seen, top = set(), []
        for j in range(top_val.shape[1]):
            if not top_val[f, j] > 0 or len(top) == cfg.top_examples:
                break
            ids, acts, peak = ex.context(int(top_win[f, j]), int(top_pos[f, j]), top_ctx[f, j])
            key = tuple(ids[max(0, peak - 8) : peak + 3])  # the same text around the peak = a duplicate
            if key in seen:
                continue
            seen.add(key)
            top.append((ids, acts, peak, float(top_val[f, j])))
        tops.append(top)
        labels.append(auto_label([([vocab[i] for i in ids], p) for ids, _, p, _ in top]))
        sample = [
            (int(res_win[f, j]), int(res_pos[f, j]), res_ctx[f, j], float(res_val[f, j]))
            for j in range(res_key.shape[1])
            if np.isfinite(res_key[f, j])
        ]
        show = sorted(sample[:shown], key=lambda e: e[3])
        rest = sample[shown:]
        fb = []
        for bi, part in enumerate(np.array_split(np.arange(len(show)), cfg.bands)):
            if not len(part):
                continue
            exs = [(*ex.context(show[i][0], show[i][1], show[i][2]), show[i][3]) for i in part]
            fb.append(
                {
                    "band": bi,
                    "q": [bi / cfg.bands, (bi + 1) / cfg.bands],
                    "lo": exs[0][3],
                    "hi": exs[-1][3],
                    "examples": exs,
                }
            )
        bands.append(fb)
        heldout.append([(*ex.context(w, p, cx), v) for w, p, cx, v in rest])

    explanations: dict[int, tuple[str, float | None]] = {}
    if cfg.explainer_url and cfg.explain_features:
        explanations = _explain(cfg, sae, lm, hook, windows, vocab, tops, bands, heldout, density)

    say("atlas: writing ...")
    sae_cfg = sae.cfg.model_dump()
    writer = AtlasWriter(out)
    try:
        writer.meta(
            {
                "format_version": ATLAS_FORMAT_VERSION,
                "saelab_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "sae": {"path": str(sae_dir.resolve()), "cfg": sae_cfg},
                "model": model,
                "hook_name": hook,
                "corpus": cfg.corpus,
                "tokens": s.tokens,
                "windows": s.windows,
                "context_length": T,
                "n_features": n,
                "has_logits": logits is not None,
                "settings": cfg.model_dump(exclude={"explainer_url", "progress", "device"}),
                "metrics": {
                    **metrics,
                    "atlas_l0": float(count.sum() / s.tokens),
                    "atlas_dead_fraction": float((count == 0).mean()),
                },
                "hist_log10": list(HIST_LOG10),
                "density_hist": _density_hist(density),
            }
        )
        writer.vocab(vocab)
        rows, tf_rows, pages = [], [], []
        for f in range(n):
            label, conf = labels[f]
            expl, score = explanations.get(f, (None, None))
            rows.append(
                (
                    f,
                    float(density[f]),
                    int(count[f]),
                    float(max_act[f]),
                    float(mean_act[f]),
                    label,
                    conf,
                    expl,
                    score,
                )
            )
            fired: dict[int, float] = {}
            for ids, acts, _, _ in tops[f]:
                for i, a in zip(ids, acts, strict=True):
                    if a > 0 and a > fired.get(i, 0):
                        fired[i] = a
            tf_rows.extend((i, f, a) for i, a in fired.items())
            related = [int(i) for i in near_i[f].tolist()] + [
                int(i) for i, v in zip(co_i[f].tolist(), co_v[f].tolist(), strict=True) if v > 0
            ]
            page = {
                "id": f,
                "label": label,
                "label_confidence": conf,
                "explanation": expl,
                "explanation_score": score,
                "density": float(density[f]),
                "count": int(count[f]),
                "max_act": float(max_act[f]),
                "mean_act": float(mean_act[f]),
                "hist": hist[f].tolist(),
                "top": [{"act": v, "peak": p, "t": ids, "a": a} for ids, a, p, v in tops[f]],
                "bands": [
                    {
                        **{k: b[k] for k in ("band", "q", "lo", "hi")},
                        "examples": [
                            {"act": v, "peak": p, "t": ids, "a": a} for ids, a, p, v in b["examples"]
                        ],
                    }
                    for b in bands[f]
                ],
                "neighbours": _pairs(near_i[f], near_v[f]),
                "cofire": [p for p in _pairs(co_i[f], co_v[f]) if p[1] > 0],
                "labels": {str(i): labels[i][0] for i in related},
            }
            used = {
                i for e in page["top"] + [x for b in page["bands"] for x in b["examples"]] for i in e["t"]
            }
            if logits is not None:
                pv, pi, nv, ni = logits
                page["logits"] = {"pos": _pairs(pi[f], pv[f]), "neg": _pairs(ni[f], nv[f])}
                used |= {int(i) for i in pi[f].tolist() + ni[f].tolist()}
            page["vocab"] = {str(i): vocab[i] for i in sorted(used)}
            pages.append((f, pack_page(page)))
            if len(pages) >= 2048:
                writer.features(rows)
                writer.token_features(tf_rows)
                writer.pages(pages)
                rows, tf_rows, pages = [], [], []
        writer.features(rows)
        writer.token_features(tf_rows)
        writer.pages(pages)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _explain(
    cfg: AtlasConfig,
    sae: SAE,
    lm: LoadedModel,
    hook: str,
    windows: np.ndarray,
    vocab: list[str],
    tops: list,
    bands: list,
    heldout: list,
    density: np.ndarray,
) -> dict[int, tuple[str, float | None]]:
    """Explain a random sample of ``explain_features`` firing features; score each by detection
    on its held-out firings against snippets where it does not fire."""
    assert cfg.explainer_url
    explainer = Explainer(cfg.explainer_url, cfg.explainer_model)
    rng = random.Random(cfg.seed)
    alive = [int(f) for f in np.flatnonzero(density > 0)]
    chosen = sorted(rng.sample(alive, min(cfg.explain_features, len(alive))))
    # Negatives: snippets of up to 64 random windows on which the feature does not fire.
    pick = sorted(rng.sample(range(windows.shape[0]), min(64, windows.shape[0])))
    ids = torch.as_tensor(windows[pick]).long()
    attn = (ids >= 0).long()
    dev = lm.device
    cap, _ = run_hooked(lm.model, ids.clamp_min(0).to(dev), attn.to(dev), capture=[hook])
    x = cap[hook].float()
    sel = torch.as_tensor(chosen, device=dev)
    fired = torch.stack([sae.encode(x[i])[:, sel] > 0 for i in range(x.shape[0])]).cpu()  # [w, T, chosen]
    fired |= ~attn.bool()[:, :, None]  # padding can't be a clean snippet
    span = cfg.before + cfg.after + 1
    out: dict[int, tuple[str, float | None]] = {}
    for j, f in enumerate(
        tqdm(chosen, desc="explain", unit="feature", dynamic_ncols=True, disable=not cfg.progress)
    ):
        shown = [([vocab[i] for i in e[0]], e[1]) for e in tops[f]] + [
            ([vocab[i] for i in t], a) for b in bands[f] for t, a, _, _ in b["examples"]
        ]
        explanation = explainer.explain(shown)
        pos = [[vocab[i] for i in e[0]] for e in heldout[f]][:5]
        # clean[w, s]: no firing (and no padding) in positions s .. s+span-1 of window w
        c = torch.nn.functional.pad(fired[:, :, j].long().cumsum(1), (1, 0))
        clean = (
            (c[:, span:] - c[:, :-span]) == 0 if c.shape[1] > span else torch.zeros(0, 0, dtype=torch.bool)
        )
        spots = clean.nonzero().tolist()
        negs = [
            [vocab[int(t)] for t in windows[pick[w], s0 : s0 + span]]
            for w, s0 in rng.sample(spots, min(len(pos), len(spots)))
        ]
        out[f] = (explanation, explainer.score(explanation, pos, negs))
    return out
