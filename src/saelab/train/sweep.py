"""Many SAEs per pass over the data: a grid of training runs sharing every batch.

One reader feeds every SAE of the grid (dictionary size × k, or × sparsity coefficient, or ×
any other setting of an architecture) the same batch in turn, so a sweep reads its data once,
whatever the grid's size. Every cell is an ordinary :class:`~saelab.train.trainer.Trainer`
with its own folder, checkpoint and metrics log, so a cell trained in a sweep is bit-identical
to the same cell trained alone, and a killed sweep resumes each cell from its own checkpoint.

The axes a grid may vary are derived from the configs: the architecture, the dictionary size,
and every numeric setting of the architectures (``k``, ``l1_coefficient``, ...). The settings
that decide which batches a cell reads (batch size, seed, tokens) are the same for every cell.
Measuring the cells, the frontier and the scaling-law fit are in :mod:`saelab.eval.scaling`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from saelab.activations.source import ActivationSource
from saelab.config import build
from saelab.config_base import scalar_type
from saelab.errors import InputError
from saelab.sae import SAE
from saelab.sae.arch import ArchConfig, arch_settings, config_class
from saelab.train.config import TrainConfig
from saelab.train.trainer import Trainer

SHARED_AXES: dict[str, type] = {"architecture": str, "n_latents": int, "expansion_factor": float}
"""The axes every architecture has."""


def grid_axes() -> dict[str, type]:
    """What a sweep may vary, with the type of its values."""
    axes = dict(SHARED_AXES)
    for name, fields in arch_settings().items():
        typ, choices = scalar_type(next(iter(fields.values())).annotation)
        if typ in (int, float) and choices is None:
            axes[name] = typ
    return axes


def grid_help() -> dict[str, str]:
    """The ``--grid-*`` help line of each axis."""
    settings = arch_settings()
    out = {"architecture": f"architectures, e.g. relu,topk (of {', '.join(ArchConfig.registry)})",
           "n_latents": "dictionary sizes, e.g. 1024,2048,4096",
           "expansion_factor": "dictionary sizes as multiples of d_in, e.g. 2,4,8"}
    for name in grid_axes():
        if name not in out:
            out[name] = f"values of {name} ({', '.join(settings[name])})"
    return out


def cells(base: TrainConfig, grid: dict[str, Sequence[Any]]) -> list[TrainConfig]:
    """Every combination of the grid's values over ``base``. An axis that is not a setting of a
    cell's architecture (k for relu, the L1 coefficient for topk) does not apply to that cell."""
    axes = grid_axes()
    bad = sorted(set(grid) - set(axes))
    if bad:
        raise InputError(f"a sweep can vary {', '.join(axes)}, not {', '.join(bad)}")
    keys = [k for k in axes if grid.get(k)]
    for k in keys:
        if len(set(grid[k])) != len(grid[k]):
            raise InputError(f"two cells of the grid are the same SAE: {k} lists a value twice; give each "
                             "value once")
    archs = list(grid.get("architecture") or [base.architecture])
    for arch in archs:
        try:
            config_class(arch)
        except ValueError as e:
            raise InputError(str(e)) from None
    for k in keys:
        if k not in SHARED_AXES and not any(k in config_class(a).model_fields for a in archs):
            raise InputError(f"--grid-{k.replace('_', '-')} is a setting of "
                             f"{', '.join(arch_settings()[k])}, not of the architectures swept "
                             f"({', '.join(archs)})")
    out, seen = [], set()
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        cls = config_class(point.get("architecture", base.architecture))
        applies = {k: v for k, v in point.items() if k in SHARED_AXES or k in cls.model_fields}
        cfg = build(TrainConfig, **{**base.model_dump(), **applies})
        key = (cfg.n_latents, cfg.expansion_factor, repr(sorted(cfg.sae.model_dump().items())))
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    if not out:
        raise InputError("the sweep grid is empty")
    return out


def cell_name(cfg: TrainConfig, d_in: int, varied: Sequence[str] = ()) -> str:
    """``<architecture>-n<latents>-<tag>``: the tag is the architecture's naming setting (``k4``,
    ``c2``), then any other of its settings the grid varies."""
    n = cfg.resolve_n_latents(d_in)
    parts = [cfg.architecture, f"n{n}"]
    named = type(cfg.sae).name_field
    if named is not None:
        parts.append(f"{named[1]}{getattr(cfg.sae, named[0]):g}")
    for key in varied:
        own = key in type(cfg.sae).model_fields
        if key not in SHARED_AXES and own and (named is None or key != named[0]):
            parts.append(f"{key}{getattr(cfg.sae, key):g}")
    return "-".join(parts)


def train_grid(source: ActivationSource, base: TrainConfig, grid: dict[str, Sequence[Any]],
               out: str | Path) -> list[tuple[TrainConfig, str, SAE]]:
    """Train every cell of ``grid`` on one pass over ``source`` into ``out/<cell>/``."""
    out = Path(out)
    configs = cells(base, grid)
    names = [cell_name(c, source.d_in, list(grid)) for c in configs]
    if len(set(names)) != len(names):
        raise InputError("two cells of the grid are the same SAE; give each value once")
    trainers = [Trainer(source, c.model_copy(update={"progress": False}), out / name)
                for c, name in zip(configs, names, strict=True)]
    active = [t for t in trainers if not t.begin()]
    steps = trainers[0].steps
    if active:
        start = min(t.step for t in active)
        bar = tqdm(total=steps * base.batch_size, initial=start * base.batch_size, unit="tok",
                   unit_scale=True, dynamic_ncols=True, disable=not base.progress,
                   desc=f"sweep ({len(active)} of {len(trainers)} SAEs)")
        batches = source.batches(base.batch_size, base.seed, start_step=start)
        try:
            for step in range(start, steps):
                x = next(batches)
                for t in active:
                    if t.step == step:  # a cell resumed further on waits for the others
                        t.train_step(x)
                bar.update(base.batch_size)
        finally:
            bar.close()
    return [(c, name, t.end()) for c, name, t in zip(configs, names, trainers, strict=True)]


def parse_grid(text: str | None, cast: type) -> list[Any]:
    """'1024,2048' -> [1024, 2048] (None or '' -> [])."""
    if not text:
        return []
    try:
        return [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"could not read {text!r} as a comma-separated list of {cast.__name__}") from None



__all__ = ["cell_name", "cells", "grid_axes", "parse_grid", "train_grid"]
