"""The whole pipeline on one model, in one call: harvest a hook's activations into a store,
train a TopK SAE on it, evaluate it by splicing it into the model, and build its atlas.

Every stage writes into its own folder under ``out``, named from its settings, and records
what it made in ``out/demo.json`` (atomically, once the stage is complete). A second run
with the same settings reuses each finished stage; a stage that was interrupted resumes
from its own partial state (the store's last complete shard, the trainer's checkpoint, the
atlas's ``.partial`` folder). Nothing a stage leaves half-done is ever recorded as done.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelab.config import AtlasConfig, DemoConfig, HarvestConfig, TextConfig
from saelab.io import atomic_write_json
from saelab.models import LoadedModel
from saelab.train.config import TrainConfig

RECORD = "demo.json"


@dataclass
class Stage:
    name: str
    seconds: float  # time spent in this run (0 when reused)
    reused: bool
    path: Path
    summary: str


@dataclass
class DemoResult:
    out: Path
    stages: list[Stage] = field(default_factory=list)
    atlas: Path | None = None
    sae: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    lm: LoadedModel | None = None  # loaded if any stage needed it

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def table(self) -> str:
        rows = [(s.name, "reused" if s.reused else f"{s.seconds:6.1f} s", s.summary) for s in self.stages]
        rows.append(("total", f"{self.seconds:6.1f} s", str(self.out)))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        return "\n".join(f"  {a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name).strip("-") or "model"


def _fmt_tokens(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


class _Record:
    """``demo.json``: per stage, the settings key it was made with and what it produced."""

    def __init__(self, out: Path) -> None:
        self.path = out / RECORD
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                self.data = {}  # written atomically, so only a foreign file gets here

    def done(self, stage: str, key: str, path: Path) -> dict[str, Any] | None:
        entry = self.data.get(stage)
        if entry and entry.get("key") == key and path.exists():
            return entry
        return None

    def finish(self, stage: str, key: str, seconds: float, **info: Any) -> None:
        self.data[stage] = {"key": key, "seconds": round(seconds, 2), **info}
        atomic_write_json(self.path, self.data)


def run_demo(cfg: DemoConfig, out: str | Path, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run (or reuse) every stage for ``cfg`` under ``out``; returns what each made."""
    from saelab.activations.harvest import harvest
    from saelab.activations.source import open_source
    from saelab.activations.store import read_manifest
    from saelab.analyse.atlas import build_atlas
    from saelab.eval.splice import splice_eval
    from saelab.models import open_model
    from saelab.sae.base import SAE
    from saelab.train.trainer import Trainer

    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = _Record(out)
    result = DemoResult(out)
    text = TextConfig(corpus=cfg.corpus, context_length=cfg.context_length, device=cfg.device)

    def model() -> LoadedModel:
        if result.lm is None:
            say(f"[model] loading {cfg.model}")
            t0 = time.perf_counter()
            result.lm = open_model(cfg.model, cfg.device)
            result.stages.append(Stage("load model", time.perf_counter() - t0, False, Path(cfg.model),
                                       f"{result.lm.name} on {result.lm.device}"))
        return result.lm

    def stage(name: str, key: str, path: Path, make: Callable[[], dict[str, Any]],
              summary: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
        done = record.done(name, key, path)
        if done is not None:
            say(f"[{name}] reusing {path}")
            result.stages.append(Stage(name, 0.0, True, path, summary(done)))
            return done
        say(f"[{name}] -> {path}")
        t0 = time.perf_counter()
        info = make()
        seconds = time.perf_counter() - t0
        record.finish(name, key, seconds, path=str(path), **info)
        result.stages.append(Stage(name, seconds, False, path, summary(info)))
        return info

    # 1. harvest: the store grows in place, so its name leaves out the token count
    store_settings = {"model": cfg.model, "hook": cfg.hook, "corpus": cfg.corpus,
                      "context_length": cfg.context_length}
    store_dir = out / f"store-{_slug(cfg.model)}-{cfg.hook}-{_key(store_settings)}"
    harvest_key = _key({**store_settings, "tokens": cfg.tokens})

    def do_harvest() -> dict[str, Any]:
        hc = HarvestConfig(model=cfg.model, hooks=[cfg.hook], corpus=cfg.corpus,
                           context_length=cfg.context_length, tokens=cfg.tokens, device=cfg.device,
                           progress=cfg.progress)
        harvest(hc, store_dir, lm=model())
        return {"rows": int(read_manifest(store_dir)["token_count"])}

    stage("harvest", harvest_key, store_dir, do_harvest,
          lambda i: f"{i['rows']:,} activation rows of {cfg.hook}")

    # 2. train
    train_settings = {"store": harvest_key, "expansion_factor": cfg.expansion_factor, "k": cfg.k,
                      "lr": cfg.lr, "seed": cfg.seed, "tokens": cfg.tokens}
    train_key = _key(train_settings)
    sae_dir = out / f"sae-topk-{cfg.expansion_factor:g}x-k{cfg.k}-{_fmt_tokens(cfg.tokens)}-{train_key}"

    def do_train() -> dict[str, Any]:
        tc = TrainConfig(architecture="topk", expansion_factor=cfg.expansion_factor, k=cfg.k,
                         tokens=cfg.tokens, lr=cfg.lr, seed=cfg.seed, device=cfg.device,
                         progress=cfg.progress, checkpoint_every_steps=25,
                         model_name=cfg.model, hook_name=cfg.hook)
        sae = Trainer(open_source(store_dir), tc, sae_dir).run()
        return {"n_latents": sae.n_latents}

    stage("train", train_key, sae_dir / "sae_weights.safetensors", do_train,
                 lambda i: f"TopK SAE, {i['n_latents']:,} latents, k = {cfg.k}")
    result.sae = sae_dir

    # 3. splice evaluation
    eval_key = _key({"sae": train_key, "eval_tokens": cfg.eval_tokens})
    eval_file = sae_dir / "splice_eval.json"

    def do_eval() -> dict[str, Any]:
        if not cfg.eval_tokens:
            return {"metrics": {}}
        sae = SAE.load(sae_dir)
        r = splice_eval(sae, model(), text, tokens=cfg.eval_tokens, hook=cfg.hook, progress=cfg.progress)
        atomic_write_json(eval_file, r.as_dict())
        return {"metrics": r.as_dict()}

    def eval_summary(i: dict[str, Any]) -> str:
        m = i["metrics"]
        if not m:
            return "skipped (--eval-tokens 0)"
        parts = [f"FVU {m['fvu']:.3f}", f"L0 {m['l0']:.1f}", f"dead {100 * m['dead_fraction']:.1f}%"]
        if "ce_recovered" in m:
            parts += [f"CE {m['ce_clean']:.3f} -> {m['ce_spliced']:.3f}",
                      f"CE loss recovered {m['ce_recovered']:.3f}"]
        elif "cos_spliced" in m:
            parts.append(f"embedding cos {m['cos_spliced']:.3f}")
        return ", ".join(parts) + f" ({m['tokens']:,} held-out tokens)"

    info = stage("evaluate", eval_key, eval_file if cfg.eval_tokens else sae_dir, do_eval, eval_summary)
    result.metrics = info["metrics"]

    # 4. atlas
    atlas_key = _key({"sae": train_key, "eval": eval_key, "atlas_tokens": cfg.atlas_tokens})
    atlas_path = out / f"{sae_dir.name}-{_fmt_tokens(cfg.atlas_tokens)}.atlas"

    def do_atlas() -> dict[str, Any]:
        ac = AtlasConfig(corpus=cfg.corpus, context_length=cfg.context_length, tokens=cfg.atlas_tokens,
                         eval_tokens=0, device=cfg.device, progress=cfg.progress)
        r = build_atlas(sae_dir, ac, atlas_path, lm=model(), metrics=result.metrics)
        return {"features": r.features, "tokens": r.tokens,
                "tokens_per_s": round(r.tokens_per_s, 1) if r.tokens_per_s else None}

    stage("atlas", atlas_key, atlas_path, do_atlas,
          lambda i: f"{i['features']:,} features over {i['tokens']:,} held-out tokens")
    result.atlas = atlas_path
    return result
