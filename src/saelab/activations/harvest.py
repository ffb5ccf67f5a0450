"""Model × tokens → activations: into a store on disk, or straight into training.

:func:`harvest` streams corpus windows through the model, stops each forward pass after
the last hook needed, drops BOS/CLS/SEP and padding positions, and writes every hook's
rows to its own store (``OUT`` for one hook, ``OUT/<hook>`` for several). Shards are
written whole and listed only when complete, so a killed harvest re-run with the same
arguments resumes after its last complete shard and ends with the same bytes.

:class:`ModelStream` is the same stream as an
:class:`~saelab.activations.source.ActivationSource`, for training without the disk.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab import __version__, stage
from saelab.activations.hooks import hook_width, parse_hook, run_hooked
from saelab.activations.source import rebatch
from saelab.activations.store import StoreWriter, damaged_shard, is_store, read_manifest
from saelab.config import HarvestConfig, TextConfig
from saelab.data.text import Split, TokenBatch, text_batches
from saelab.errors import InputError
from saelab.models import LoadedModel, open_model

# Settings a resumed harvest must share with the run it continues (as its manifest has them).
_FIXED = ("model", "hook_name", "d_in", "corpus", "split", "context_length", "keep_special",
          "heldout_fraction", "text_field", "dtype")
# Settings that do not change what a harvest writes.
_FREE = ("device", "progress", "batch_size")


def harvest_settings(cfg: HarvestConfig) -> stage.Settings:
    """The settings that decide a harvest's stores (what its completion marker records)."""
    return stage.Settings.of("harvest", cfg.model_dump(), free=_FREE)


def check_hooks(lm: LoadedModel, hooks: list[str]) -> None:
    for h in hooks:
        parse_hook(lm.model, h)
    dup = {h for h in hooks if hooks.count(h) > 1}
    if dup:
        raise InputError(f"hook point(s) given twice: {', '.join(sorted(dup))}")


def activations(lm: LoadedModel, hooks: list[str], batch: TokenBatch) -> dict[str, Tensor]:
    """The rows of each hook at the batch's content positions, on the model's device."""
    dev = lm.device
    captured, _ = run_hooked(lm.model, batch.input_ids.to(dev), batch.attention_mask.to(dev),
                             capture=hooks)
    mask = batch.content_mask.to(dev)
    return {h: captured[h][mask] for h in hooks}


def first_tokens(batches: Iterable[TokenBatch], tokens: int) -> list[TokenBatch]:
    """The leading windows that hold at least ``tokens`` content tokens (whole windows)."""
    out, got = [], 0
    for b in batches:
        per_window = b.content_mask.sum(1).cumsum(0)
        if got + int(per_window[-1]) >= tokens:
            keep = int(torch.searchsorted(per_window, tokens - got)) + 1
            out.append(b.take(keep))
            break
        out.append(b)
        got += int(per_window[-1])
    return out


def store_dirs(out: Path, hooks: list[str]) -> dict[str, Path]:
    return {hooks[0]: out} if len(hooks) == 1 else {h: out / h for h in hooks}


def harvest(cfg: HarvestConfig, out: str | Path, lm: LoadedModel | None = None) -> list[Path]:
    """Harvest ``cfg.tokens`` rows per hook into stores under ``out``; returns their paths.
    Re-running with the same arguments resumes (or extends, with a larger ``tokens``)."""
    out = Path(out)
    split: Split = cfg.split
    settings = harvest_settings(cfg)
    dirs = store_dirs(out, cfg.hooks)
    # Shards a resumed or repeated harvest keeps are checked against their sha256 first:
    # a damaged or missing one is written again, with every shard after it.
    damage = {d: damaged_shard(d, cfg.progress) for d in dirs.values() if is_store(d)}
    damage = {d: v for d, v in damage.items() if v is not None}
    for d, (i, what) in damage.items():
        later = len(read_manifest(d)["shards"]) - i - 1
        print(f"store {d}: shard {what}; writing it again" + (f", and the {later} after it" if later else ""),
              file=sys.stderr)
    if not damage and stage.finished(out, settings) is not None and all(is_store(d) for d in dirs.values()):
        if cfg.progress:
            print(f"{out}: this harvest is already complete; reusing it", file=sys.stderr)
        return list(dirs.values())
    stage.clear(out)
    lm = lm or open_model(cfg.model, cfg.device)
    check_hooks(lm, cfg.hooks)
    if len(cfg.hooks) > 1 and is_store(out):
        raise InputError(f"{out} is already a single-hook store; pass another --out for several hooks")
    writers: dict[str, StoreWriter] = {}
    for h, d in dirs.items():
        meta = {"model": cfg.model, "model_type": lm.model_type, "hook_name": h,
                "d_in": hook_width(lm.model, h), "corpus": cfg.corpus, "split": split,
                "context_length": cfg.context_length, "keep_special": cfg.keep_special,
                "heldout_fraction": cfg.heldout_fraction, "text_field": cfg.text_field,
                "dtype": cfg.dtype, "saelab_version": __version__,
                **({"aligned_hooks": list(cfg.hooks)} if len(cfg.hooks) > 1 else {})}
        if is_store(d):
            old = read_manifest(d)
            fixed = stage.Settings("harvest", {k: meta[k] for k in _FIXED})
            fixed.require_same({k: old.get(k) for k in _FIXED}, d, fix="pass another --out or delete it")
        writers[h] = StoreWriter(d, meta, cfg.dtype)
    # Line the stores up at the last shard every hook completed.
    n_shards = min([len(w.shards) for w in writers.values()] + [i for i, _ in damage.values()])
    for w in writers.values():
        if len(w.shards) > n_shards:
            w.truncate(n_shards)
    first = writers[cfg.hooks[0]]
    done = int(first.manifest["token_count"])
    windows_done = int(first.shards[-1]["windows_end"]) if first.shards else 0
    if done >= cfg.tokens:
        if done > cfg.tokens:
            print(f"{out} already holds {done:,} rows per hook (more than --tokens {cfg.tokens:,}); "
                  "nothing to do", file=sys.stderr)
        for w in writers.values():
            w.finish()
        stage.mark_finished(out, settings, {"rows_per_hook": done, "hooks": list(cfg.hooks)})
        return list(dirs.values())
    for w in writers.values():
        w.manifest["complete"] = False
        w.manifest["target_tokens"] = cfg.tokens

    bar = tqdm(total=cfg.tokens, initial=done, unit="tok", unit_scale=True, desc="harvest",
               dynamic_ncols=True, disable=not cfg.progress)
    buffers: dict[str, list[Tensor]] = {h: [] for h in cfg.hooks}
    buffered, windows = 0, windows_done
    to_cpu = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.dtype]

    def flush() -> None:
        nonlocal buffered
        for h, w in writers.items():
            w.write_shard(torch.cat(buffers[h]), windows_end=windows)
            buffers[h] = []
        buffered = 0
        bar.set_postfix_str(f"{len(first.shards)} shards")

    try:
        for batch in text_batches(lm, cfg, split, skip_windows=windows_done):
            rows = activations(lm, cfg.hooks, batch)
            take = min(batch.n_content, cfg.tokens - done)
            for h in cfg.hooks:
                buffers[h].append(rows[h][:take].to("cpu", to_cpu))
            windows += batch.input_ids.shape[0]
            done += take
            buffered += take
            bar.update(take)
            if buffered >= cfg.shard_rows or done >= cfg.tokens:
                flush()
            if done >= cfg.tokens:
                break
        if buffered:
            flush()
    finally:
        bar.close()
    if done < cfg.tokens:
        print(f"warning: corpus {cfg.corpus!r} ran out after {done:,} {split} tokens "
              f"(asked for {cfg.tokens:,}); the store holds what there was", file=sys.stderr)
    for w in writers.values():
        w.finish({"target_tokens": cfg.tokens})
    stage.mark_finished(out, settings, {"rows_per_hook": done, "hooks": list(cfg.hooks)})
    return list(dirs.values())


class ModelStream:
    """Activations straight from the model, shuffled through a bounded buffer; an
    :class:`~saelab.activations.source.ActivationSource` for training without a store.

    The corpus is cut into groups of ``group_windows`` windows; each group's rows are
    shuffled together. A resumed run finds its group by tokenising only (no forward
    pass), so it sees the same batches as a run that never stopped.
    """

    def __init__(self, lm: LoadedModel, hook: str, text: TextConfig, tokens: int,
                 buffer_rows: int = 1 << 16, split: Split = "train") -> None:
        check_hooks(lm, [hook])
        self.lm, self.hook, self.text, self.split = lm, hook, text, split
        self.d_in = hook_width(lm.model, hook)
        self.n_rows = int(tokens)
        per_batch = max(1, text.context_length - 2) * text.batch_size
        self.group_windows = text.batch_size * max(1, buffer_rows // per_batch)
        self.hook_name, self.model_name = hook, lm.name

    def _batches(self, skip_windows: int = 0) -> Iterator[TokenBatch]:
        return text_batches(self.lm, self.text, self.split, skip_windows=skip_windows)

    def _rows(self, batch: TokenBatch) -> Tensor:
        return activations(self.lm, [self.hook], batch)[self.hook].float().cpu()

    def _groups(self, count_only: bool, start: int = 0) -> Iterator[tuple[int, Any]]:
        """(index within its epoch, rows or row count) of successive groups, forever;
        the first epoch starts at group ``start``."""
        while True:
            g, parts, windows = start, [], 0
            for batch in self._batches(skip_windows=start * self.group_windows):
                parts.append(batch.n_content if count_only else self._rows(batch))
                windows += batch.input_ids.shape[0]
                if windows == self.group_windows:
                    yield g, sum(parts) if count_only else torch.cat(parts)
                    g, parts, windows = g + 1, [], 0
            if parts:
                yield g, sum(parts) if count_only else torch.cat(parts)
            elif g == 0:
                raise InputError(f"corpus {self.text.corpus!r} gave no {self.split} tokens")
            start = 0

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Tensor]:
        skip_rows, number, start = start_step * batch_size, 0, 0
        if skip_rows:
            for g, size in self._groups(count_only=True):
                if skip_rows < size:
                    start = g
                    break
                skip_rows -= size
                number += 1

        def shuffled() -> Iterator[Tensor]:
            nonlocal skip_rows, number
            for _, rows in self._groups(count_only=False, start=start):
                perm = np.random.default_rng([seed, number]).permutation(rows.shape[0])
                yield rows[torch.from_numpy(perm)][skip_rows:]
                skip_rows, number = 0, number + 1

        return rebatch(shuffled(), batch_size)

    def sample(self, n: int, seed: int) -> Tensor:
        parts, got = [], 0
        for batch in self._batches():
            parts.append(self._rows(batch))
            got += parts[-1].shape[0]
            if got >= n:
                break
        return torch.cat(parts)[:n]

    def rows(self, batch_size: int, limit: int | None = None) -> Iterator[Tensor]:
        limit = self.n_rows if limit is None else limit
        pending = torch.empty(0, self.d_in)
        sent = 0
        for batch in self._batches():
            pending = torch.cat([pending, self._rows(batch)])
            while pending.shape[0] >= batch_size or (pending.shape[0] and sent + pending.shape[0] >= limit):
                take = min(batch_size, limit - sent)
                out, pending = pending[:take], pending[take:]
                yield out
                sent += out.shape[0]
                if sent >= limit:
                    return
        if pending.shape[0]:
            yield pending

    def describe(self) -> str:
        return f"{self.lm.name} {self.hook} on {self.text.corpus} (streamed, {self.d_in} wide)"
