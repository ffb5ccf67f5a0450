"""The whole pipeline on one model, in one call: harvest a hook's activations into a store,
train a TopK SAE on it, evaluate it by splicing it into the model, and build its atlas.

Every stage writes into its own folder under ``out``, named from its settings, and leaves
its completion marker (:mod:`saelab.stage`) once its result is complete; ``out/demo.json``
sums up what each made. A second run with the same settings reuses each finished stage
without loading the model; a stage that was interrupted resumes
from its own partial state (the store's last complete shard, the trainer's checkpoint, the
atlas's ``.partial`` folder). Nothing a stage leaves half-done is ever recorded as done.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelab import stage
from saelab.config import AtlasConfig, DemoConfig, HarvestConfig, TextConfig
from saelab.io import atomic_write_json
from saelab.models import LoadedModel
from saelab.stage import Settings
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name).strip("-") or "model"


def _fmt_tokens(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


class _Record:
    """``demo.json``: what each stage made, written as each finishes (a summary for people
    and tests; whether a stage is reused is decided by its own completion marker)."""

    def __init__(self, out: Path) -> None:
        self.path = out / RECORD
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                self.data = {}  # written atomically, so only a foreign file gets here

    def finish(self, stage: str, key: str, seconds: float, **info: Any) -> None:
        self.data[stage] = {"key": key, "seconds": round(seconds, 2), **info}
        atomic_write_json(self.path, self.data)


def run_demo(cfg: DemoConfig, out: str | Path, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run (or reuse) every stage for ``cfg`` under ``out``; returns what each made."""
    from saelab.activations.harvest import harvest, harvest_settings
    from saelab.activations.source import open_source
    from saelab.activations.store import read_manifest
    from saelab.analyse.atlas import atlas_settings, build_atlas
    from saelab.eval.splice import saved_splice_eval, splice_settings
    from saelab.models import open_model
    from saelab.train.trainer import Trainer, run_settings

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

    def step(name: str, path: Path, settings: Settings, make: Callable[[], dict[str, Any]],
             summary: Callable[[dict[str, Any]], str], shown: Path | None = None) -> dict[str, Any]:
        """Reuse the stage's result at ``path`` if its completion marker names these settings,
        else make it (the stage writes its own marker)."""
        t0 = time.perf_counter()
        done = stage.finished(path, settings)
        if done is not None:
            say(f"[{name}] reusing {path}")
            info, seconds = done, 0.0
        else:
            say(f"[{name}] -> {path}")
            info = make()
            seconds = time.perf_counter() - t0
        record.finish(name, settings.fingerprint, seconds, path=str(shown or path), **info)
        result.stages.append(Stage(name, seconds, done is not None, path, summary(info)))
        return info

    # 1. harvest: the store grows in place, so its name leaves out the token count
    hc = HarvestConfig(model=cfg.model, hooks=[cfg.hook], corpus=cfg.corpus,
                       context_length=cfg.context_length, tokens=cfg.tokens, device=cfg.device,
                       progress=cfg.progress)
    store_key = Settings.of("store", hc.model_dump(exclude={"tokens"}),
                            free=("device", "progress")).fingerprint
    store_dir = out / f"store-{_slug(cfg.model)}-{cfg.hook}-{store_key[:8]}"
    harvested = harvest_settings(hc)

    def do_harvest() -> dict[str, Any]:
        harvest(hc, store_dir, lm=model())
        return {"rows_per_hook": int(read_manifest(store_dir)["token_count"])}

    step("harvest", store_dir, harvested, do_harvest,
         lambda i: f"{i['rows_per_hook']:,} activation rows of {cfg.hook}")

    # 2. train
    tc = TrainConfig(architecture="topk", expansion_factor=cfg.expansion_factor, k=cfg.k,
                     tokens=cfg.tokens, optimizer=cfg.optimizer, lr=cfg.lr, seed=cfg.seed, device=cfg.device,
                     progress=cfg.progress, checkpoint_every_steps=25,
                     model_name=cfg.model, hook_name=cfg.hook)
    trained = run_settings(tc)
    # the folder is named from the data's settings and the run's, so other data is another folder
    train_key = Settings("sae", {"store": harvested.fingerprint, "run": trained.fingerprint}).fingerprint
    sae_dir = out / f"sae-topk-{cfg.expansion_factor:g}x-k{cfg.k}-{_fmt_tokens(cfg.tokens)}-{train_key[:8]}"

    def do_train() -> dict[str, Any]:
        sae = Trainer(open_source(store_dir), tc, sae_dir).run()
        return {"n_latents": sae.n_latents}

    step("train", sae_dir, trained, do_train,
         lambda i: f"TopK SAE, {i['n_latents']:,} latents, k = {cfg.k}",
         shown=sae_dir / "sae_weights.safetensors")
    result.sae = sae_dir

    # 3. splice evaluation
    eval_file = sae_dir / "splice_eval.json"

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

    t0 = time.perf_counter()
    metrics: dict[str, Any] = {}
    reused, key = False, "skipped"
    if cfg.eval_tokens:
        evaluated = splice_settings(sae_dir, text, cfg.eval_tokens, cfg.hook)
        key = evaluated.fingerprint
        say(f"[evaluate] {'reusing' if stage.finished(eval_file, evaluated) else '->'} {eval_file}")
        metrics, reused = saved_splice_eval(sae_dir, eval_file, model, text, cfg.eval_tokens, cfg.hook,
                                            progress=cfg.progress)
    seconds = 0.0 if reused else time.perf_counter() - t0
    record.finish("evaluate", key, seconds, path=str(eval_file), metrics=metrics)
    result.stages.append(Stage("evaluate", seconds, reused, eval_file, eval_summary({"metrics": metrics})))
    result.metrics = metrics

    # 4. atlas
    atlas_path = out / f"{sae_dir.name}-{_fmt_tokens(cfg.atlas_tokens)}.atlas"
    ac = AtlasConfig(model=cfg.model, hook=cfg.hook, corpus=cfg.corpus, context_length=cfg.context_length,
                     tokens=cfg.atlas_tokens, eval_tokens=0, device=cfg.device, progress=cfg.progress)

    def do_atlas() -> dict[str, Any]:
        r = build_atlas(sae_dir, ac, atlas_path, lm=model(), metrics=result.metrics)
        return {"features": r.features, "tokens": r.tokens,
                "tokens_per_s": round(r.tokens_per_s, 1) if r.tokens_per_s else None}

    step("atlas", atlas_path, atlas_settings(sae_dir, cfg.model, cfg.hook, ac, result.metrics), do_atlas,
         lambda i: f"{i['features']:,} features over {i['tokens']:,} held-out tokens")
    result.atlas = atlas_path
    return result
