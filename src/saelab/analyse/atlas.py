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

from saelab import __version__, stage
from saelab.activations.hooks import residual_directions, run_hooked, unembedding
from saelab.analyse.atlasdb import ATLAS_FORMAT_VERSION, AtlasWriter, pack_page
from saelab.analyse.explain import Explainer, auto_label
from saelab.analyse.page import (
    AtlasMeta,
    Band,
    DensityHistogram,
    Example,
    FeaturePage,
    LogitEffects,
    SAERef,
)
from saelab.config import AtlasConfig, TextConfig
from saelab.data.text import text_batches
from saelab.errors import InputError
from saelab.eval.splice import splice_eval
from saelab.io import atomic_torch_save
from saelab.models import LoadedModel, open_model
from saelab.sae.base import SAE, check_sae_fits
from saelab.sae.foreign import weights_file

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


# Settings that do not change an atlas; and those the streaming pass does not depend on
# (more tokens extend it; the explanations and the splice metrics come after it).
_FREE = ("progress", "checkpoint_every", "device", "batch_size")
_PASS_FREE = (*_FREE, "tokens", "explainer_url", "explainer_model", "explain_features", "eval_tokens")


def atlas_settings(sae_dir: Path, model: str, hook: str, cfg: AtlasConfig,
                   metrics: dict[str, Any] | None = None, pass_only: bool = False) -> stage.Settings:
    """The settings that decide the atlas of the SAE in ``sae_dir`` (``pass_only``: those
    that decide its streaming pass, which a resumed build must share)."""
    values = {"sae": stage.file_identity(weights_file(sae_dir)), "model": model, "hook": hook,
              **cfg.model_dump(exclude={"model", "hook"})}
    if pass_only:
        return stage.Settings.of("atlas pass", values, free=_PASS_FREE)
    return stage.Settings.of("atlas", {**values, "metrics": metrics or None}, free=_FREE)


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


def _density_hist(density: np.ndarray) -> DensityHistogram:
    lo, hi, nb = DENSITY_LOG10
    alive = density[density > 0]
    counts, _ = np.histogram(np.log10(np.clip(alive, 10**lo, 1.0)), bins=nb, range=(lo, hi))
    return DensityHistogram(lo=lo, hi=hi, counts=counts.tolist(), dead=int((density == 0).sum()))


def _pairs(ids: Tensor, values: Tensor) -> list[tuple[int, float]]:
    """[(id, value), ...] for a page, values to 4 decimals."""
    return [(int(i), round(float(v), 4)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


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
    reused: bool = False  # a finished atlas with these settings was already there


def _model_and_hook(sae: SAE, sae_dir: Path, cfg: AtlasConfig) -> tuple[str, str]:
    """The model and hook the atlas reads: the config's, else the SAE's cfg.json's."""
    model = cfg.model or sae.cfg.model_name
    hook = cfg.hook or sae.cfg.hook_name
    if not model or not hook:
        what = "model" if not model else "hook"
        raise InputError(f"{sae_dir}/cfg.json names no {what}; pass --{what}")
    if sae.cfg.hook_name and hook != sae.cfg.hook_name:
        raise InputError(f"the SAE in {sae_dir} was trained on {sae.cfg.hook_name}, not {hook}")
    return model, hook


class _Partial:
    """The pass's resumable state beside the atlas (``<out>.partial``): ``state.pt`` with the
    fingerprint of the settings the pass depends on, and ``windows.bin``, the token ids
    [windows, T] of every window read so far."""

    def __init__(self, out: Path, fingerprint: str) -> None:
        self.folder = out.with_name(out.name + ".partial")
        self.state_file, self.windows_file = self.folder / "state.pt", self.folder / "windows.bin"
        self.fingerprint = fingerprint

    def resume_or_start(self, n: int, cfg: AtlasConfig, device: torch.device) -> _State:
        state = None
        if self.state_file.is_file():
            saved = torch.load(self.state_file, weights_only=False)
            if saved.get("fingerprint") == self.fingerprint:
                state = _State.from_dict(saved["state"], device)
            else:
                print(f"{self.folder}: left by a build with other settings; starting over", file=sys.stderr)
        if state is None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            state = _State.empty(n, 2 * cfg.top_examples, 2 * cfg.bands * cfg.band_examples,
                                 cfg.before + cfg.after + 1, device, cfg.seed)
        with open(self.windows_file, "ab") as f:  # keep exactly the windows the state has seen
            f.truncate(state.windows * cfg.context_length * 4)
        return state

    def save(self, state: _State) -> None:
        atomic_torch_save({"fingerprint": self.fingerprint, "state": state.to_dict()}, self.state_file)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _stream(sae: SAE, lm: LoadedModel, hook: str, cfg: AtlasConfig, state: _State,
            partial: _Partial) -> tuple[int, float]:
    """The streaming pass: held-out windows through the model to the hook and the SAE, every
    content token's latents into ``state`` (saved every ``checkpoint_every`` seconds), the
    windows' token ids appended to the partial's file. Returns (tokens read now, seconds)."""
    dev, n, T = lm.device, sae.n_latents, cfg.context_length
    step = _Pass(cfg, state, T, dev)
    chunk_windows = max(1, MAX_CHUNK_ELEMENTS // (T * n))
    bar = tqdm(total=cfg.tokens, initial=min(state.tokens, cfg.tokens), unit="tok", unit_scale=True,
               desc="atlas", dynamic_ncols=True, disable=not cfg.progress)
    t0 = last_save = time.perf_counter()
    tokens_at_start = state.tokens
    with open(partial.windows_file, "ab") as wf:
        for batch in text_batches(lm, cfg, "heldout", skip_windows=state.windows):
            if state.tokens >= cfg.tokens:
                break
            per_window = batch.content_mask.sum(1).cumsum(0)
            need = cfg.tokens - state.tokens
            if int(per_window[-1]) > need:
                batch = batch.take(int(torch.searchsorted(per_window, need)) + 1)
            ids_BT, attn_BT = batch.input_ids.to(dev), batch.attention_mask.to(dev)
            cap, _ = run_hooked(lm.model, ids_BT, attn_BT, capture=[hook])
            x_BTD = cap[hook].float()
            mask_BT = batch.content_mask.to(dev)
            for a, b in _chunks(ids_BT.shape[0], chunk_windows):
                z_BTF = sae.encode(x_BTD[a:b].reshape(-1, sae.d_in)).reshape(b - a, T, n).float()
                z_BTF = z_BTF * mask_BT[a:b, :, None]
                step.update(z_BTF, state.windows + a, int(mask_BT[a:b].sum()))
            toks_BT = batch.input_ids.to(torch.int32).masked_fill(batch.attention_mask == 0, -1)
            wf.write(toks_BT.numpy().tobytes())
            state.windows += ids_BT.shape[0]
            got = int(batch.n_content)
            state.tokens += got
            bar.update(got)
            if time.perf_counter() - last_save > cfg.checkpoint_every:
                wf.flush()
                partial.save(state)
                last_save = time.perf_counter()
    bar.close()
    seconds = time.perf_counter() - t0
    if state.tokens == 0:
        raise InputError(f"corpus {cfg.corpus!r} has no held-out documents to build an atlas from")
    partial.save(state)
    return state.tokens - tokens_at_start, seconds


@torch.no_grad()
def build_atlas(
    sae_dir: str | Path,
    cfg: AtlasConfig,
    out: str | Path,
    lm: LoadedModel | None = None,
    metrics: dict[str, Any] | None = None,
) -> AtlasResult:
    """Build the atlas of the SAE in ``sae_dir`` into the SQLite file ``out`` (or reuse the
    one there, if it was built with these settings). ``metrics``: splice-evaluation figures
    already measured (else ``cfg.eval_tokens`` are evaluated)."""
    t_start = time.perf_counter()
    sae_dir, out = Path(sae_dir), Path(out)
    sae = SAE.load(sae_dir)
    model, hook = _model_and_hook(sae, sae_dir, cfg)
    # 1. a finished atlas with these settings: reuse it
    settings = atlas_settings(sae_dir, model, hook, cfg, metrics)
    done = stage.finished(out, settings)
    if done is not None and out.is_file():
        if cfg.progress:
            print(f"{out}: this atlas is already built with these settings; reusing it", file=sys.stderr)
        return AtlasResult(out, int(done["tokens"]), int(done["features"]), 0.0, None, reused=True)
    stage.clear(out)
    lm = lm or open_model(model, cfg.device)
    check_sae_fits(sae, lm, hook)
    sae = sae.to(lm.device).eval()
    # 2. the streaming pass, resumed from the partial state a killed build left
    partial = _Partial(out, atlas_settings(sae_dir, model, hook, cfg, pass_only=True).fingerprint)
    state = partial.resume_or_start(sae.n_latents, cfg, lm.device)
    pass_tokens, pass_seconds = _stream(sae, lm, hook, cfg, state, partial)
    # 3. the splice metrics for the global page, unless given
    metrics = dict(metrics or {})
    if not metrics and cfg.eval_tokens:
        text = TextConfig(**cfg.model_dump(include=set(TextConfig.model_fields)))
        metrics = splice_eval(sae, lm, text, tokens=cfg.eval_tokens, hook=hook,
                              progress=cfg.progress).as_dict()
    # 4. pages, rows and meta into the atlas file; then the completion marker
    path = _finish(sae_dir, sae, lm, model, hook, cfg, state, partial.windows_file, out, metrics)
    partial.remove()
    seconds = time.perf_counter() - t_start
    rate = pass_tokens / pass_seconds if pass_tokens else None
    stage.mark_finished(out, settings, {"features": sae.n_latents, "tokens": state.tokens,
                                        "tokens_per_s": None if rate is None else round(rate, 1)},
                        seconds=seconds)
    return AtlasResult(path=path, tokens=state.tokens, features=sae.n_latents, seconds=seconds,
                       tokens_per_s=rate)


@dataclass
class _Stats:
    """Per-feature statistics of the pass: [F] arrays (and the [F, bins] histogram)."""

    count_F: np.ndarray
    density_F: np.ndarray
    mean_act_F: np.ndarray
    max_act_F: np.ndarray
    hist_FB: np.ndarray

    @classmethod
    def of(cls, s: _State) -> _Stats:
        count_F = s.count.cpu().numpy()
        return cls(count_F=count_F, density_F=count_F / s.tokens,
                   mean_act_F=(s.act_sum.cpu().numpy() / np.maximum(count_F, 1)).astype(np.float32),
                   max_act_F=s.act_max.cpu().numpy(), hist_FB=s.hist.cpu().numpy())


@dataclass
class _Kept:
    """The pass's kept candidates, sorted: top examples strongest first ([F, Kc]), the
    uniform sample by its random key ([F, R]); contexts [F, ·, C]."""

    top_val_FK: np.ndarray
    top_win_FK: np.ndarray
    top_pos_FK: np.ndarray
    top_ctx_FKC: np.ndarray
    res_key_FR: np.ndarray
    res_val_FR: np.ndarray
    res_win_FR: np.ndarray
    res_pos_FR: np.ndarray
    res_ctx_FRC: np.ndarray

    @classmethod
    def of(cls, s: _State) -> _Kept:
        def by(order: Tensor, *ts: Tensor) -> list[np.ndarray]:
            return [t.gather(1, order if t.dim() == 2 else order[..., None].expand(-1, -1, t.shape[2]))
                    .cpu().numpy() for t in ts]

        # Slots are unordered during the pass.
        o_top = torch.argsort(s.top_val, dim=1, descending=True, stable=True)
        o_res = torch.argsort(s.res_key, dim=1, stable=True)
        return cls(*by(o_top, s.top_val, s.top_win, s.top_pos, s.top_ctx),
                   *by(o_res, s.res_key, s.res_val, s.res_win, s.res_pos, s.res_ctx))


_Context = tuple[list[int], list[float], int, float]  # token ids, activations, peak index, activation


@dataclass
class _FeatureExamples:
    """One feature's examples: shown (top, bands) and held out to score explanations."""

    top: list[_Context]
    bands: list[Band]
    heldout: list[_Context]


def _example(c: _Context) -> Example:
    ids, acts, peak, act = c
    return Example(act=act, peak=peak, t=ids, a=acts)


def _examples_of(f: int, kept: _Kept, ex: _Examples, cfg: AtlasConfig) -> _FeatureExamples:
    """Feature f's top examples (the same text around the peak counted once) and its
    uniform sample: the first bands x band_examples shown in quantile bands, the rest held out."""
    seen, top = set(), []
    for j in range(kept.top_val_FK.shape[1]):
        if not kept.top_val_FK[f, j] > 0 or len(top) == cfg.top_examples:
            break
        ids, acts, peak = ex.context(int(kept.top_win_FK[f, j]), int(kept.top_pos_FK[f, j]),
                                     kept.top_ctx_FKC[f, j])
        key = tuple(ids[max(0, peak - 8) : peak + 3])
        if key in seen:
            continue
        seen.add(key)
        top.append((ids, acts, peak, float(kept.top_val_FK[f, j])))
    sample = [(int(kept.res_win_FR[f, j]), int(kept.res_pos_FR[f, j]), kept.res_ctx_FRC[f, j],
               float(kept.res_val_FR[f, j]))
              for j in range(kept.res_key_FR.shape[1]) if np.isfinite(kept.res_key_FR[f, j])]
    shown_n = cfg.bands * cfg.band_examples
    shown = sorted(sample[:shown_n], key=lambda e: e[3])
    bands = []
    for bi, part in enumerate(np.array_split(np.arange(len(shown)), cfg.bands)):
        if not len(part):
            continue
        exs = [(*ex.context(shown[i][0], shown[i][1], shown[i][2]), shown[i][3]) for i in part]
        bands.append(Band(band=bi, q=(bi / cfg.bands, (bi + 1) / cfg.bands), lo=exs[0][3], hi=exs[-1][3],
                          examples=[_example(e) for e in exs]))
    heldout = [(*ex.context(w, p, cx), v) for w, p, cx, v in sample[shown_n:]]
    return _FeatureExamples(top, bands, heldout)


@dataclass
class _Links:
    """Each feature's relations: nearest by decoder cosine, co-firing by Jaccard ([F, k]),
    and the logit effects ([F, k] values and token ids, raised and lowered) if the model has
    an LM head."""

    near_v_FK: Tensor
    near_i_FK: Tensor
    co_v_FK: Tensor
    co_i_FK: Tensor
    logits: tuple[Tensor, Tensor, Tensor, Tensor] | None

    def related(self, f: int) -> list[int]:
        return self.near_i_FK[f].tolist() + [
            int(i) for i, v in zip(self.co_i_FK[f].tolist(), self.co_v_FK[f].tolist(), strict=True) if v > 0]


def _page(f: int, stats: _Stats, exs: _FeatureExamples, links: _Links, labels: list[tuple[str, float]],
          explanation: tuple[str | None, float | None], vocab: list[str]) -> FeaturePage:
    label, conf = labels[f]
    top = [_example(c) for c in exs.top]
    logits = None
    used = {i for e in top + [x for b in exs.bands for x in b.examples] for i in e.t}
    if links.logits is not None:
        pv, pi, nv, ni = links.logits
        logits = LogitEffects(pos=_pairs(pi[f], pv[f]), neg=_pairs(ni[f], nv[f]))
        used |= {int(i) for i in pi[f].tolist() + ni[f].tolist()}
    return FeaturePage(
        id=f, label=label, label_confidence=conf, explanation=explanation[0],
        explanation_score=explanation[1], density=float(stats.density_F[f]), count=int(stats.count_F[f]),
        max_act=float(stats.max_act_F[f]), mean_act=float(stats.mean_act_F[f]),
        hist=stats.hist_FB[f].tolist(), top=top, bands=exs.bands,
        neighbours=_pairs(links.near_i_FK[f], links.near_v_FK[f]),
        cofire=[p for p in _pairs(links.co_i_FK[f], links.co_v_FK[f]) if p[1] > 0],
        labels={str(i): labels[i][0] for i in links.related(f)}, logits=logits,
        vocab={str(i): vocab[i] for i in sorted(used)})


def _fired_tokens(f: int, top: list[_Context]) -> list[tuple[int, int, float]]:
    """(token id, feature, strongest activation) of each token f fires on in its top examples."""
    fired: dict[int, float] = {}
    for ids, acts, _, _ in top:
        for i, a in zip(ids, acts, strict=True):
            if a > 0 and a > fired.get(i, 0):
                fired[i] = a
    return [(i, f, a) for i, a in fired.items()]


def _finish(sae_dir: Path, sae: SAE, lm: LoadedModel, model: str, hook: str, cfg: AtlasConfig,
            s: _State, windows_file: Path, out: Path, metrics: dict[str, Any]) -> Path:
    """From the pass's state to the atlas file: statistics, relations, examples and labels,
    optional explanations, then the meta, the rows and the pages."""
    n, T = sae.n_latents, cfg.context_length
    say = (lambda m: print(m, file=sys.stderr)) if cfg.progress else (lambda m: None)
    say("atlas: nearest features, co-firing, logit effects ...")
    stats, kept = _Stats.of(s), _Kept.of(s)
    links = _Links(*_nearest(sae, cfg.neighbours), *_cofiring(s.co_tok, s.co_feat, n, cfg.neighbours),
                   _logit_effects(sae, lm, hook, cfg.logit_tokens))
    vocab = vocab_texts(lm.tokenizer)
    windows_WT = np.fromfile(windows_file, dtype=np.int32).reshape(-1, T)
    ex = _Examples(windows_WT, cfg.before, cfg.after)
    examples = [_examples_of(f, kept, ex, cfg) for f in tqdm(
        range(n), desc="atlas examples", unit="feature", dynamic_ncols=True, disable=not cfg.progress)]
    labels = [auto_label([([vocab[i] for i in ids], p) for ids, _, p, _ in e.top]) for e in examples]
    explanations: dict[int, tuple[str, float | None]] = {}
    if cfg.explainer_url and cfg.explain_features:
        explanations = _explain(cfg, sae, lm, hook, windows_WT, vocab, examples, stats.density_F)

    say("atlas: writing ...")
    meta = AtlasMeta(
        format_version=ATLAS_FORMAT_VERSION, saelab_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        sae=SAERef(path=str(sae_dir.resolve()), cfg=sae.cfg.model_dump()), model=model, hook_name=hook,
        corpus=cfg.corpus, tokens=s.tokens, windows=s.windows, context_length=T, n_features=n,
        has_logits=links.logits is not None,
        settings=cfg.model_dump(exclude={"explainer_url", "progress", "device"}),
        metrics={**metrics, "atlas_l0": float(stats.count_F.sum() / s.tokens),
                 "atlas_dead_fraction": float((stats.count_F == 0).mean())},
        hist_log10=HIST_LOG10, density_hist=_density_hist(stats.density_F))
    writer = AtlasWriter(out)
    try:
        writer.meta(meta.model_dump(exclude_none=True))
        writer.vocab(vocab)
        for a, b in _chunks(n, 2048):
            pages = [_page(f, stats, examples[f], links, labels, explanations.get(f, (None, None)), vocab)
                     for f in range(a, b)]
            writer.features([(p.id, p.density, p.count, p.max_act, p.mean_act, p.label, p.label_confidence,
                              p.explanation, p.explanation_score) for p in pages])
            writer.token_features([r for f in range(a, b) for r in _fired_tokens(f, examples[f].top)])
            writer.pages([(p.id, pack_page(p.model_dump())) for p in pages])
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
    examples: list[_FeatureExamples],
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
        shown = [([vocab[i] for i in e[0]], e[1]) for e in examples[f].top] + [
            ([vocab[i] for i in e.t], e.a) for b in examples[f].bands for e in b.examples
        ]
        explanation = explainer.explain(shown)
        pos = [[vocab[i] for i in e[0]] for e in examples[f].heldout][:5]
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
