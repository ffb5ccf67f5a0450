"""The ``saelab`` command: a thin layer over the library.

Flags for training are generated from :class:`saelab.config.TrainConfig`, so ``--help``
shows the same descriptions and defaults the library uses. User mistakes end in one line
on stderr and exit status 1 (argparse's own usage errors: 2); Ctrl-C exits 130 and a
re-run of the same command resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saelab.errors import SaelabError


def _train_source(args: argparse.Namespace, drop_nonfinite: bool) -> tuple[Any, dict[str, str]]:
    """The activation source of `saelab train` and what it says about its model and hook."""
    from saelab.activations.source import open_source
    from saelab.errors import InputError

    if args.acts is not None:
        if args.model or args.hook:
            raise InputError("pass either --acts or --model/--hook (streaming), not both")
        if args.target_acts is not None:
            from saelab.activations.source import open_pairs

            source = open_pairs(args.acts, args.target_acts, allow_incomplete=args.allow_incomplete)
        else:
            source = open_source(args.acts, drop_nonfinite=drop_nonfinite,
                                 allow_incomplete=args.allow_incomplete)
        names = {"model_name": getattr(source, "model_name", None),
                 "hook_name": getattr(source, "hook_name", None),
                 "hook_name_out": getattr(source, "hook_name_out", None)}
        return source, {k: v for k, v in names.items() if v}
    if args.target_acts is not None:
        raise InputError("--target-acts goes with --acts (the input activations of the same rows)")
    if not (args.model and args.hook):
        raise InputError("say where activations come from: --acts FILE_OR_STORE, or --model M --hook H "
                         "[--corpus C] to stream them from the model")
    from saelab.activations.harvest import ModelStream
    from saelab.config import TextConfig, build
    from saelab.models import open_model

    text = build(TextConfig, **{k: v for k, v in {
        "corpus": args.corpus, "context_length": args.context_length}.items() if v is not None})
    lm = open_model(args.model)
    tokens = args.tokens or 2_000_000
    return ModelStream(lm, args.hook, text, tokens), {"model_name": args.model, "hook_name": args.hook}


# A trained SAE whose FVU on its training rows is above this reconstructs worse than the
# data's mean (FVU 1), with room for a short run's noise: the run failed, whatever its exit.
MAX_FVU = 1.5


def _train(args: argparse.Namespace) -> int:
    from saelab.eval.metrics import evaluate_reconstruction
    from saelab.flags import from_args
    from saelab.train.config import TrainConfig
    from saelab.train.trainer import Trainer

    cfg = from_args(TrainConfig, args)
    source, names = _train_source(args, cfg.drop_nonfinite)
    cfg = from_args(TrainConfig, args, **{k: v for k, v in names.items() if getattr(cfg, k) is None})
    from saelab.parallel import SINGLE, Communicator, init_from_env

    comm: Communicator = SINGLE
    if args.distributed:
        comm, device = init_from_env(args.latent_shards)
        cfg = cfg.model_copy(update={"device": str(device)})
    elif args.latent_shards != 1:
        from saelab.errors import InputError

        raise InputError("--latent-shards needs --distributed (under torchrun)")
    try:
        trainer = Trainer(source, cfg, args.out, comm=comm)
        if comm.is_main:
            print(f"training {cfg.architecture} SAE on {source.describe()}{comm.describe()} -> {args.out}",
                  file=sys.stderr)
        t0 = time.perf_counter()
        sae = trainer.run()
    finally:
        comm.close()
    if not comm.is_main:
        return 0
    rows = min(source.n_rows, 100_000)
    m = evaluate_reconstruction(sae, source.rows(8192, limit=rows))
    print(f"done in {time.perf_counter() - t0:.1f} s; on the first {rows:,} rows (training data): "
          f"FVU {m.fvu:.4f}, L0 {m.l0:.1f}, dead {100 * m.dead_fraction:.1f}%", file=sys.stderr)
    if not math.isfinite(m.fvu) or m.fvu > MAX_FVU:
        raise SaelabError(
            f"the SAE in {args.out} did not learn: FVU {m.fvu:.4g} on its own training rows, where "
            f"predicting their mean gives 1 (more than {MAX_FVU} is refused as a result). Its weights are "
            f"kept for inspection; check the activations (d_in = {source.d_in}, their scale) and the "
            f"settings (--lr, the sparsity, --n-latents; {cfg.steps():,} steps may be too few: --tokens)")
    print(f"saved {args.out}/cfg.json and sae_weights.safetensors")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from saelab.activations.source import open_source
    from saelab.eval.scaling import describe, run_sweep
    from saelab.flags import from_args
    from saelab.train.config import TrainConfig
    from saelab.train.sweep import grid_axes, parse_grid

    grid = {key: parse_grid(getattr(args, f"grid_{key}"), cast) for key, cast in grid_axes().items()}
    source = open_source(args.acts, drop_nonfinite=bool(args.drop_nonfinite),
                         allow_incomplete=bool(args.allow_incomplete))
    names = {k: v for k, v in {"model_name": getattr(source, "model_name", None),
                               "hook_name": getattr(source, "hook_name", None)}.items() if v}
    base = from_args(TrainConfig, args, **{k: v for k, v in names.items() if getattr(args, k, None) is None})
    held = open_source(args.eval_acts) if args.eval_acts else None
    if held is not None and held.d_in != source.d_in:
        from saelab.errors import InputError

        raise InputError(f"{args.eval_acts} has width {held.d_in}, {args.acts} has {source.d_in}")
    t0 = time.perf_counter()
    r = run_sweep(source, base, {k: v for k, v in grid.items() if v}, args.out, eval_source=held,
                  eval_rows=args.eval_rows)
    print(describe(r.rows))
    print(f"\n{len(r.rows)} SAEs in {time.perf_counter() - t0:.0f} s; {r.csv}, {r.frontier}")
    if r.scaling:
        s = r.scaling
        print(f"L(N, K) fit: log FVU = {s['alpha']:.3f} + {s['beta_k']:.3f} log K + {s['beta_n']:.3f} log N "
              f"+ {s['gamma']:.4f} log K log N  (R² {s['r2']:.3f}); {args.out}/scaling.json, scaling.png")
    return 0


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    print(title)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v:>10}")


def _bench(args: argparse.Namespace) -> int:
    from saelab.config import BenchConfig
    from saelab.eval.bench import bench
    from saelab.flags import from_args

    cfg = from_args(BenchConfig, args)
    cards = bench(list(args.sae_dirs), args.out, cfg)
    print((args.out / "bench.md").read_text(encoding="utf-8"), end="")
    print(f"{len(cards)} card(s) in {args.out} (bench.csv, bench.md, bench.png, one JSON per SAE)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from saelab.config import EvalConfig
    from saelab.errors import InputError
    from saelab.flags import from_args
    from saelab.sae.base import SAE

    cfg = from_args(EvalConfig, args)
    sae = SAE.load(args.sae_dir)
    if args.acts is not None and cfg.model is not None:
        raise InputError("pass either --acts (reconstruction only) or --model (splice into the model)")
    if args.acts is None and cfg.model is None:
        if not sae.cfg.model_name:
            raise InputError(f"{args.sae_dir}: its cfg.json names no model; pass --acts or --model")
        cfg = cfg.model_copy(update={"model": sae.cfg.model_name})
    if cfg.model is not None:
        return _eval_splice(args, cfg, sae)
    return _eval_acts(args, cfg, sae)


def _eval_acts(args: argparse.Namespace, cfg: Any, sae: Any) -> int:
    from saelab.activations.source import open_source
    from saelab.errors import InputError
    from saelab.eval.metrics import evaluate_reconstruction

    if sae.reads_pairs:
        from saelab.activations.source import open_pairs

        if args.target_acts is None:
            raise InputError(f"{args.sae_dir} is a transcoder: give --target-acts too (the activations of "
                             f"{sae.cfg.hook_name_out or 'its output hook'})")
        source: Any = open_pairs(args.acts, args.target_acts, allow_incomplete=cfg.allow_incomplete)
    else:
        source = open_source(args.acts, drop_nonfinite=cfg.drop_nonfinite,
                             allow_incomplete=cfg.allow_incomplete)
    if source.d_in != sae.d_in:
        raise InputError(
            f"{args.acts} has width {source.d_in} but the SAE in {args.sae_dir} reads d_in = "
            f"{sae.d_in}; evaluate it on activations from its hook ({sae.cfg.hook_name or 'unknown'})"
        )
    hook = getattr(source, "hook_name", None)
    if hook and sae.cfg.hook_name and hook != sae.cfg.hook_name:
        raise InputError(f"{args.acts} holds {hook} but the SAE in {args.sae_dir} reads "
                         f"{sae.cfg.hook_name}")
    m = evaluate_reconstruction(sae, source.rows(cfg.batch_size, limit=cfg.max_rows))
    result = {"sae": str(args.sae_dir), "acts": str(args.acts),
              "architecture": sae.cfg.architecture, "n_latents": sae.n_latents, **m.as_dict()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(f"{sae.cfg.architecture} SAE, {sae.n_latents:,} latents, on {args.acts}", [
            ("FVU", f"{m.fvu:.4f}"), ("explained variance", f"{m.explained_variance:.4f}"),
            ("MSE per row", f"{m.mse:.4g}"), ("L0", f"{m.l0:.2f}"),
            ("dead latents", f"{100 * m.dead_fraction:.2f}%"),
            ("dense latents (>10%)", f"{100 * m.dense_fraction:.2f}%"),
            ("cos(x, x̂)", f"{m.cossim:.4f}"), ("‖x̂‖ / ‖x‖", f"{m.l2_ratio:.4f}"),
            ("relative reconstruction bias", f"{m.relative_reconstruction_bias:.4f}"),
            ("log10 density, mean / median (live latents)",
             f"{m.density_log10_mean:.2f} / {m.density_log10_median:.2f}"),
            ("ultra-low density (<1e-5)", f"{100 * m.ultralow_fraction:.2f}%"), ("rows", f"{m.rows:,}")])
    return 0


def _eval_splice(args: argparse.Namespace, cfg: Any, sae: Any) -> int:
    from saelab.errors import InputError
    from saelab.eval.splice import splice_eval
    from saelab.models import open_model

    hook = cfg.hook or sae.cfg.hook_name
    if cfg.hook and sae.cfg.hook_name and cfg.hook != sae.cfg.hook_name:
        raise InputError(f"the SAE in {args.sae_dir} was trained on {sae.cfg.hook_name}, not {cfg.hook}")
    text = cfg.text()
    lm = open_model(cfg.model, cfg.device)
    r = splice_eval(sae, lm, text, tokens=cfg.tokens, hook=hook)
    result = {"sae": str(args.sae_dir), "architecture": sae.cfg.architecture,
              "n_latents": sae.n_latents, "corpus": text.corpus, **r.as_dict()}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [("FVU", f"{r.fvu:.4f}"), ("L0", f"{r.l0:.2f}"), ("dead latents", f"{100 * r.dead_fraction:.2f}%"),
            ("dense latents (>10%)", f"{100 * r.dense_fraction:.2f}%")]
    if r.ce_clean is not None:
        rows += [("CE loss clean", f"{r.ce_clean:.4f}"), ("CE loss spliced", f"{r.ce_spliced:.4f}"),
                 ("CE loss zero-ablated (every position)", f"{r.ce_zero:.4f}"),
                 ("CE loss zero-ablated (the SAE's positions)", f"{r.ce_zero_sae_positions:.4f}"),
                 ("CE loss mean-ablated", f"{r.ce_mean:.4f}"),
                 ("CE loss recovered (SAELens/SAEBench: zero every position)", f"{r.ce_recovered:.4f}"),
                 ("CE loss recovered (saelab 0.5: zero the SAE's positions)",
                  f"{r.ce_recovered_sae_positions:.4f}"),
                 ("CE loss recovered (mean)", f"{r.ce_recovered_mean:.4f}"),
                 ("delta CE", f"{r.delta_ce:.4f}"), ("KL(clean || spliced)", f"{r.kl:.4f}")]
    else:
        rows += [("embedding cos, spliced", f"{r.cos_spliced:.4f}"),
                 ("embedding cos, zero-ablated", f"{r.cos_zero:.4f}"),
                 ("embedding cos, mean-ablated", f"{r.cos_mean:.4f}")]
    rows.append(("held-out tokens", f"{r.tokens:,}"))
    where = f"{hook} -> {sae.cfg.hook_name_out}" if sae.cfg.hook_name_out else hook
    _print_table(f"{sae.cfg.architecture} SAE, {sae.n_latents:,} latents, spliced into {lm.name} {where} "
                 f"on {text.corpus} (held-out)", rows)
    return 0


def _harvest(args: argparse.Namespace) -> int:
    from saelab.activations.harvest import harvest
    from saelab.activations.store import open_store
    from saelab.config import HarvestConfig
    from saelab.flags import from_args

    cfg = from_args(HarvestConfig, args)
    t0 = time.perf_counter()
    paths = harvest(cfg, args.out)
    for p in paths:
        store = open_store(p, verify=False, allow_incomplete=True)
        print(f"{p}: {store.n_rows:,} rows x {store.d_in} ({store.hook_name}), "
              f"{len(store.shards)} shards, {store.dtype}")
    print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


def _atlas(args: argparse.Namespace) -> int:
    from saelab.analyse.atlas import build_atlas
    from saelab.config import AtlasConfig
    from saelab.flags import from_args

    cfg = from_args(AtlasConfig, args)
    r = build_atlas(args.sae_dir, cfg, args.out)
    rate = f"{r.tokens_per_s:,.0f} tokens/s in the pass, " if r.tokens_per_s else ""
    how = "already built with these settings, reused" if r.reused else f"{rate}{r.seconds:.0f} s in all"
    print(f"{r.path}: {r.features:,} features over {r.tokens:,} held-out tokens ({how})")
    print(f"browse it: saelab serve {r.path}")
    return 0


def _export_html(args: argparse.Namespace) -> int:
    from saelab.view.export import export_html

    out = export_html(args.atlas, args.out)
    print(f"{out}/index.html: open it in a browser, or host the folder as static files")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from saelab.config import ServeConfig
    from saelab.errors import InputError
    from saelab.flags import from_args
    from saelab.view.server import serve_atlases, served_names

    cfg = from_args(ServeConfig, args)
    companions = {}
    for spec in args.companions or []:
        name, sep, path = spec.partition("=")
        if not (sep and path and re.fullmatch(r"[A-Za-z0-9._-]+", name)):
            raise InputError(f"--with {spec!r}: write NAME=ATLAS, NAME in letters, digits, '-', '_', '.'")
        companions[name] = Path(path)
    app = serve_atlases(args.atlas, companions, name=cfg.name, live=cfg.live, sae_dir=cfg.sae,
                        device=cfg.device, max_chars=cfg.max_chars, max_tokens=cfg.max_tokens,
                        hosts=served_names(cfg.host), docs=cfg.docs)
    _run_server(app, cfg.host, cfg.port, cfg.log_level)
    return 0


def _run_server(app: Any, host: str, port: int, log_level: str = "warning") -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"saelab: listening on {host}: anyone who can reach it can read the atlas "
              "and run the live model", file=sys.stderr)
    print(f"viewer: http://{'127.0.0.1' if host == '127.0.0.1' else host}:{port}/  (Ctrl-C stops it)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)


def _demo(args: argparse.Namespace) -> int:
    from saelab.config import DemoConfig
    from saelab.demo import run_demo
    from saelab.flags import from_args

    preset = DemoConfig.quick() if args.quick else {}
    unset = {k: v for k, v in preset.items() if getattr(args, k, None) is None}
    cfg = from_args(DemoConfig, args, **unset)
    out = args.out
    print(f"saelab demo: {cfg.model} {cfg.hook}, {cfg.tokens:,} tokens of {cfg.corpus}, "
          f"TopK {cfg.expansion_factor:g}x k = {cfg.k} -> {out}", file=sys.stderr)
    r = run_demo(cfg, out)
    print(f"\nsaelab demo: done in {r.seconds:.0f} s")
    print(r.table())
    if r.atlas is None:
        return 0
    if not args.serve:
        print(f"\nbrowse it: saelab serve {r.atlas}")
        return 0
    from saelab.view.server import create_app, served_names

    print()
    app = create_app(r.atlas, device=cfg.device, lm=r.lm, hosts=served_names(args.host))
    _run_server(app, args.host, args.port)
    return 0


def side_by_side(left: str, right: str, titles: tuple[str, str], width: int = 48) -> str:
    """Two texts in two columns (newlines shown as ⏎ so the columns stay aligned)."""
    import textwrap

    cols = [textwrap.wrap(t.replace("\n", "⏎ "), width) or [""] for t in (left, right)]
    rows = [f"{titles[0]:<{width}} │ {titles[1]}", f"{'─' * width}─┼─{'─' * width}"]
    for i in range(max(len(c) for c in cols)):
        a, b = (c[i] if i < len(c) else "" for c in cols)
        rows.append(f"{a:<{width}} │ {b}")
    return "\n".join(rows)


def _steer(args: argparse.Namespace) -> int:
    from saelab.config import SteerConfig
    from saelab.errors import InputError
    from saelab.flags import from_args
    from saelab.models import open_model
    from saelab.sae.base import SAE, check_sae_fits
    from saelab.steer import Edit, generate

    given = (("clamp", args.clamp), ("scale", args.scale), ("add", args.add))
    modes = {m: v for m, v in given if v is not None}
    if args.ablate:
        modes["ablate"] = 0.0
    if len(modes) != 1:
        raise InputError("say how to change the feature(s): exactly one of --clamp V, --scale V, --ablate, "
                         "--add V")
    (mode, value), = modes.items()
    cfg = from_args(SteerConfig, args)
    sae = SAE.load(args.sae)
    model = cfg.model or sae.cfg.model_name
    hook = cfg.hook or sae.cfg.hook_name
    if not model or not hook:
        raise InputError(f"{args.sae}/cfg.json names no model or hook; pass --model and --hook")
    lm = open_model(model, cfg.device)
    check_sae_fits(sae, lm, hook)
    sae = sae.to(lm.device).eval()
    edits = [Edit(f, mode, value) for f in args.feature]
    c = generate(lm, sae, hook, cfg.prompt, edits, max_new_tokens=cfg.max_new_tokens)
    what = ", ".join(f"#{f}" for f in args.feature)
    amount = {"ablate": "", "clamp": f" = {value:g}", "scale": f" x {value:g}",
              "add": f" + {value:g} x direction"}
    label = f"{mode} {what}{amount[mode]}"
    print(f"prompt: {cfg.prompt}\n")
    print(side_by_side(c.clean, c.steered, ("unsteered", f"steered ({label})")))
    return 0


def _toy(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from saelab.flags import from_args
    from saelab.studies.superposition import ToySweepConfig, run_toy, sweep_cells

    preset = ToySweepConfig.quick().model_dump(exclude={"data"}) if args.quick else {}
    unset = {k: v for k, v in preset.items() if getattr(args, k, None) is None}
    cfg = from_args(ToySweepConfig, args, **unset)  # flags beat the --quick preset
    bar = tqdm(total=len(sweep_cells(cfg)), unit="sae", desc="toy sweep", dynamic_ncols=True)

    def report(r: dict) -> None:
        bar.set_postfix_str(f"{r['architecture']} {r['param']}={r['value']:g} "
                            f"{r['ratio']:g}x mmcs={r['mmcs']:.3f}")
        bar.update()

    t0 = time.perf_counter()
    out = Path(args.out)
    _, reused = run_toy(cfg, out, on_result=report)
    bar.close()
    print((out / "summary.md").read_text())
    how = "reused: the sweep with these settings was already there" if reused else \
        f"in {time.perf_counter() - t0:.0f} s"
    print(f"wrote {out}/sweep.csv, {out}/mmcs_relu.png, {out}/mmcs_topk.png, {out}/summary.md ({how})")
    return 0


def _lm_train(args: argparse.Namespace) -> int:
    from saelab.config import LMConfig
    from saelab.flags import from_args
    from saelab.lm.train import train_lm

    cfg = from_args(LMConfig, args)
    r = train_lm(cfg, args.out)
    i = r.info
    print(f"held-out loss {r.heldout_loss:.4f} nats/token on {i['heldout_tokens_measured']:,} held-out "
          "tokens; "
          f"{i['train_tokens_seen']:,} training tokens at {i['tokens_per_second']:,} tok/s; "
          f"{i['parameters']:,} parameters")
    print(f"saved {r.folder} (load it with --model {r.folder})")
    return 0


def _study_monosemanticity(args: argparse.Namespace) -> int:
    from saelab.config import build
    from saelab.studies.monosemanticity import MonosemanticityConfig, run_study
    from saelab.train.sweep import parse_grid

    lists = {k: v for k, v in {
        "sizes": parse_grid(args.sizes, float), "family_sizes": parse_grid(args.family_sizes, float),
        "architectures": parse_grid(args.architectures, str)}.items() if v}
    given = {k: v for k, v in vars(args).items() if k in MonosemanticityConfig.model_fields and v is not None}
    preset = MonosemanticityConfig.quick() if args.quick else {}
    cfg = build(MonosemanticityConfig, **{**preset, **given, **lists})  # flags beat the --quick preset
    r = run_study(cfg, args.out)
    out = Path(args.out)
    print((out / "results.md").read_text())
    s = r["neurons_vs_features"]
    name = f"{cfg.compare_architecture}-{cfg.compare_size:g}x"
    for key in ("label_confidence", "token_concentration", "detection_f1"):
        n, f = s["neurons"][key], s["features"][key]
        if n and f:
            print(f"{key:<20} median: neurons {n['median']:.3f}, {name} features {f['median']:.3f}")
    print(f"\nwrote {out}/results.csv, results.md, sizes.png, interpretability.csv, neurons_vs_features.png, "
          f"splits.md, splits.json, study.json in {r['seconds']['total']:.0f} s")
    companions = " ".join(f"--with {n}={p}" for n, p in r["atlases"].items() if n != name)
    print(f"browse: saelab serve {r['atlases'][name]} {companions}")
    return 0


def _split(args: argparse.Namespace) -> int:
    from saelab.activations.source import open_source
    from saelab.analyse.atlasdb import Atlas
    from saelab.analyse.split import families
    from saelab.config import SplitConfig
    from saelab.flags import from_args
    from saelab.sae.base import SAE

    cfg = from_args(SplitConfig, args)
    small, large = SAE.load(args.small), SAE.load(args.large)
    rows = None
    if args.acts is not None:
        rows = next(open_source(args.acts).rows(cfg.rows, limit=cfg.rows))
    labels_small = Atlas(args.atlas_small).labels(list(range(small.n_latents))) if args.atlas_small else {}
    labels_large = Atlas(args.atlas_large).labels(list(range(large.n_latents))) if args.atlas_large else {}
    fams = families(small, large, args.feature or None, cfg.min_cosine, rows, cfg.top)
    if not args.feature:
        fams = fams[: cfg.families]
    result = []
    for fam in fams:
        fam.label = labels_small.get(fam.parent)
        for d in fam.descendants:
            d.label = labels_large.get(d.feature)
        result.append(fam)
    if args.json:
        from dataclasses import asdict

        print(json.dumps([asdict(f) for f in result], indent=2))
        return 0
    print(f"{args.small} ({small.n_latents:,} features) -> {args.large} ({large.n_latents:,}); descendants: "
          f"decoder cosine >= {cfg.min_cosine}" + (f", r = activation correlation on {len(rows):,} rows"
                                                      if rows is not None else ""))
    for fam in result:
        corr = f", r {fam.family_correlation:.2f}" if fam.family_correlation is not None else ""
        print(f"\n#{fam.parent} {fam.label or ''}  (family cosine {fam.family_cosine:.2f}{corr})")
        if not fam.descendants:
            print("   no descendant above the cosine floor")
        for d in fam.descendants:
            r = f"  r {d.correlation:.2f}" if d.correlation is not None else ""
            print(f"   -> #{d.feature:<6} cos {d.cosine:.2f}{r}  {d.label or ''}")
    return 0


def nested(sub: Any, name: str, help: str, description: str) -> Any:
    """A command with subcommands of its own (saelab lm train, saelab study ...)."""
    p = sub.add_parser(name, help=help, description=description)
    return p.add_subparsers(dest=f"{name}_command", required=True, metavar=f"{name.upper()}_COMMAND")


def build_parser() -> argparse.ArgumentParser:
    from saelab import __version__
    from saelab.config import (
        AtlasConfig,
        BenchConfig,
        DemoConfig,
        EvalConfig,
        HarvestConfig,
        LMConfig,
        ServeConfig,
        SplitConfig,
        SteerConfig,
    )
    from saelab.flags import add_arguments
    from saelab.studies.monosemanticity import MonosemanticityConfig
    from saelab.studies.superposition import ToySweepConfig
    from saelab.train.config import TrainConfig
    from saelab.train.sweep import grid_help

    parser = argparse.ArgumentParser(
        prog="saelab", description="Sparse autoencoders on neural-network activations.")
    parser.add_argument("--version", action="version", version=f"saelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train an SAE on activations",
                       description="Train an SAE on an activation store (saelab harvest), a .npy or "
                       ".safetensors matrix [rows, d_in], or straight from a model (--model/--hook, no "
                       "disk). Re-running with the same --out resumes an interrupted run.")
    p.add_argument("--acts", type=Path, default=None,
                   help="activation store folder, or a .npy / .safetensors matrix")
    p.add_argument("--target-acts", type=Path, default=None,
                   help="for a transcoder (--arch transcoder): the activations it reconstructs, row-aligned "
                   "with --acts (a store harvested in the same run, e.g. OUT/blocks.6.hook_mlp_out)")
    p.add_argument("--out", required=True, type=Path, help="output folder (SAE, checkpoint, metrics.jsonl)")
    s = p.add_argument_group("streaming from a model instead of --acts")
    s.add_argument("--model", default=None, help="model (alias, HF folder or .gguf)")
    s.add_argument("--hook", default=None, help="hook point, e.g. blocks.6.hook_resid_post")
    s.add_argument("--corpus", default=None, help="corpus [default: python-docs+python-stdlib]")
    s.add_argument("--context-length", type=int, default=None, help="tokens per window [default: 256]")
    d = p.add_argument_group("several processes (launch with torchrun)")
    d.add_argument("--distributed", action="store_true",
                   help="train on the torchrun process group: torchrun --nproc-per-node N -m saelab train "
                   "--distributed ... (gloo on CPU, NCCL on CUDA)")
    d.add_argument("--latent-shards", type=int, default=1, metavar="S",
                   help="split the latents over S processes (TopK); the other factor of the process count "
                   "is data parallel [default: 1]")
    add_arguments(p, TrainConfig, group_title="training options (the architecture's settings name the "
                  "architectures that have them)")
    p.set_defaults(func=_train, writes="folder")

    p = sub.add_parser("sweep", help="train a grid of SAEs on one pass over the data",
                       description="Train every combination of the --grid-* values (dictionary size x k, "
                       "or x sparsity coefficient) on one pass over the activations, every SAE seeing "
                       "each batch in turn, so the sweep reads the data once. Each SAE gets OUT/<name>/ "
                       "with its checkpoint (a killed sweep resumes); then sweep.csv, the FVU-L0 "
                       "frontier (frontier.png) and, for TopK over two or more sizes and k, the fit of "
                       "the scaling law L(N, K) (scaling.json, scaling.png).")
    p.add_argument("--acts", required=True, type=Path, help="activations: store folder, .npy or .safetensors")
    p.add_argument("--out", required=True, type=Path, help="sweep folder")
    p.add_argument("--eval-acts", type=Path, default=None,
                   help="held-out activations to measure on [default: the first rows of --acts]")
    p.add_argument("--eval-rows", type=int, default=100_000, help="rows to measure on [default: 100000]")
    g = p.add_argument_group("the grid (each a comma-separated list; every combination is one SAE)")
    for key, what in grid_help().items():
        g.add_argument(f"--grid-{key.replace('_', '-')}", dest=f"grid_{key}", default=None, metavar="A,B,…",
                       help=what)
    add_arguments(p, TrainConfig, group_title="training options (every SAE; a --grid-* value wins)")
    p.set_defaults(func=_sweep, writes="folder")

    p = sub.add_parser("eval", help="measure an SAE on activations or spliced into its model",
                       description="With --acts: FVU, explained variance, L0, dead and dense latents on "
                       "stored activations. With --model (default: the model in the SAE's cfg.json): run "
                       "the model on held-out text clean, with the SAE's reconstruction spliced in, and with "
                       "zero and mean ablation; report CE loss recovered, delta CE and KL (or, for encoders, "
                       "embedding cosine) with FVU, L0, dead and dense latents on the same tokens.")
    p.add_argument("sae_dir", type=Path, help="SAE folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("--acts", type=Path, default=None, help="activation store, .npy or .safetensors")
    p.add_argument("--target-acts", type=Path, default=None,
                   help="with --acts, for a transcoder: the activations it reconstructs (row-aligned)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_arguments(p, EvalConfig, group_title="evaluation options")
    p.set_defaults(func=_eval)

    p = sub.add_parser("bench", help="the report card of SAEs: every metric, offline",
                       description="Run the report-card metrics on each SAE folder (saelab, SAELens, "
                       "sparsify or dictionary_learning): core (the splice evaluation with cos(x, x̂) and "
                       "relative reconstruction bias) and sparse_probing (k-sparse latent probes on 11 "
                       "binary tasks against the whole activation). Writes OUT/NAME/METRIC.json, a card "
                       "OUT/NAME.json per SAE, bench.csv, bench.md and bench.png. A re-run skips the "
                       "metrics already finished.")
    p.add_argument("sae_dirs", type=Path, nargs="+", metavar="SAE_DIR", help="SAE folders")
    p.add_argument("--out", type=Path, required=True, help="folder for the results")
    add_arguments(p, BenchConfig, group_title="bench options")
    p.set_defaults(func=_bench, writes="folder")

    p = sub.add_parser("harvest", help="run a model over a corpus and store activations",
                       description="Stream a corpus through a model and write the activations at one "
                       "or more hook points to a sharded store (manifest.json + .npy shards). BOS/CLS/SEP "
                       "and padding positions are dropped. Re-running the same command resumes after the "
                       "last complete shard.")
    p.add_argument("--hook", dest="hooks", action="append", required=True, metavar="HOOK",
                   help="hook point, e.g. blocks.6.hook_resid_post (repeat for several; each gets "
                   "OUT/<hook>)")
    p.add_argument("--out", required=True, type=Path, help="store folder")
    add_arguments(p, HarvestConfig, exclude={"hooks"}, group_title="harvest options")
    p.set_defaults(func=_harvest, writes="folder")

    p = sub.add_parser("atlas", help="build the feature atlas of an SAE (then: saelab serve)",
                       description="Run the SAE's model over held-out text and record, for every feature, "
                       "its density, activation histogram, top and quantile-band examples, logit effects, "
                       "nearest and co-firing features and a label, in one SQLite file. A killed build "
                       "re-run with the same arguments resumes. `saelab atlas export-html ATLAS --out DIR` "
                       "writes the atlas as a static site.")
    p.add_argument("sae_dir", type=Path, help="SAE folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("--out", required=True, type=Path, help="atlas file to write, e.g. runs/sae.atlas")
    add_arguments(p, AtlasConfig, group_title="atlas options")
    p.set_defaults(func=_atlas, writes="file")

    p = sub.add_parser("export-html", help="write an atlas as a static site (also: saelab atlas export-html)",
                       prog="saelab atlas export-html",
                       description="Write the atlas as a folder of static files (index.html and data "
                       "scripts) that opens from disk or any static host; everything but the live text box.")
    p.add_argument("atlas", type=Path, help="atlas file (saelab atlas --out)")
    p.add_argument("--out", required=True, type=Path, help="folder to write")
    p.set_defaults(func=_export_html)

    p = sub.add_parser("serve", help="browse an atlas in a web viewer",
                       description="Serve the atlas viewer: the feature list, feature pages, search, "
                       "the global page, and a live text box that runs the model and SAE on any text. "
                       "Read-only; bound to 127.0.0.1 unless --host says otherwise.")
    p.add_argument("atlas", type=Path, help="atlas file (saelab atlas --out)")
    add_arguments(p, ServeConfig, group_title="viewer options")
    p.add_argument("--with", dest="companions", action="append", metavar="NAME=ATLAS",
                   help="serve another atlas beside this one at /d/NAME/ (e.g. "
                   "neurons=study/atlas/neurons.atlas); repeat for several")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="the whole pipeline on a real model, then the viewer",
                       description="Load the model, harvest a residual-stream hook over the corpus "
                       "into an activation store, train a TopK SAE on it, evaluate it spliced into the "
                       "model (CE loss recovered), build its feature atlas, and serve the viewer on "
                       "127.0.0.1. Each stage shows a progress bar and its time; a second run reuses "
                       "the finished stages, and one stopped by Ctrl-C resumes where it was. The "
                       "defaults take about 10 minutes on a 2-core CPU; --quick about 3.")
    p.add_argument("--quick", action="store_true",
                   help="a smaller run: 250k tokens, 4x, a 40k-token atlas [default: off]")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for every stage [default: runs/demo, or runs/demo-quick]")
    p.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True,
                   help="start the viewer when done [default: on]")
    p.add_argument("--host", default="127.0.0.1", help="viewer address [default: 127.0.0.1]")
    p.add_argument("--port", type=int, default=8000, help="viewer port [default: 8000]")
    add_arguments(p, DemoConfig, group_title="pipeline options")
    p.set_defaults(func=_demo, writes="folder")

    p = sub.add_parser("steer", help="steer a model's generation with SAE features",
                       description="Generate a greedy continuation of --prompt twice: as the model is, and "
                       "with the chosen features clamped, scaled, ablated or their decoder direction added "
                       "at the SAE's hook (the SAE's error term is kept, so untouched features leave the "
                       "model exactly as it was). Prints both side by side.")
    p.add_argument("--sae", required=True, type=Path, help="SAE folder")
    p.add_argument("--feature", type=int, action="append", required=True, metavar="ID",
                   help="feature to change (repeat for several)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--clamp", type=float, default=None, metavar="V",
                     help="set the feature's activation to V")
    how.add_argument("--scale", type=float, default=None, metavar="F", help="multiply its activation by F")
    how.add_argument("--ablate", action="store_true", help="set its activation to zero")
    how.add_argument("--add", type=float, default=None, metavar="V", help="add V x its decoder direction")
    add_arguments(p, SteerConfig, group_title="generation options")
    p.set_defaults(func=_steer)

    p = sub.add_parser("split", help="list a feature's descendants in a larger dictionary",
                       description="Match the features of two dictionaries trained on the same hook by "
                       "decoder cosine: every feature of LARGE has as parent its closest feature of SMALL, "
                       "and a feature's descendants are the features whose parent it is (above "
                       "--min-cosine). With --acts, each descendant's activation correlation with its "
                       "parent is shown too; with atlases, their labels. Without --feature: the largest "
                       "families.")
    p.add_argument("small", type=Path, help="the smaller dictionary (SAE folder)")
    p.add_argument("large", type=Path, help="the larger dictionary (SAE folder)")
    p.add_argument("--feature", type=int, action="append", metavar="ID",
                   help="feature of SMALL to trace (repeat for several) [default: the largest families]")
    p.add_argument("--acts", type=Path, default=None, help="activations (store or matrix) for correlations")
    p.add_argument("--atlas-small", type=Path, default=None, help="atlas of SMALL, for labels")
    p.add_argument("--atlas-large", type=Path, default=None, help="atlas of LARGE, for labels")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_arguments(p, SplitConfig, group_title="matching options")
    p.set_defaults(func=_split)

    studies = nested(sub, "study", "reproduce a paper's study end to end",
                     "End-to-end studies built from saelab's pipeline.")
    p = studies.add_parser("monosemanticity", help="Towards Monosemanticity on the one-layer model",
                          description="Harvest the MLP neurons of a one-layer model, train ReLU-L1 and TopK "
                          "dictionaries at every size in one pass, measure them (FVU, L0, dead, dense, CE "
                          "loss recovered), compare the neurons with the features of one dictionary on "
                          "automatic interpretability measures, and trace features splitting across sizes; "
                          "writes tables, plots and atlases to OUT. Re-running reuses every finished stage.")
    p.add_argument("--out", required=True, type=Path, help="study folder")
    p.add_argument("--quick", action="store_true", help="a small version (a few minutes)")
    p.add_argument("--sizes", default=None, metavar="A,B,…",
                   help="dictionary sizes as multiples of the hook width [default: 1,2,4,8,16,32,64]")
    p.add_argument("--family-sizes", default=None, metavar="A,B,…",
                   help="sizes traced for splitting, each with an atlas [default: 1,4,16]")
    p.add_argument("--architectures", default=None, metavar="A,B",
                   help="architectures swept [default: relu,topk]")
    add_arguments(p, MonosemanticityConfig, exclude={"sizes", "family_sizes", "architectures"},
                  group_title="study options")
    p.set_defaults(func=_study_monosemanticity, writes="folder")

    lms = nested(sub, "lm", "train a small language model here (saelab lm train)",
                 "Language models trained from scratch on a local corpus.")
    p = lms.add_parser("train", help="train a BPE tokenizer and a one-layer GPT-2-style model",
                          description="Train a byte-level BPE tokenizer on the corpus's training documents, "
                          "then a GPT-2-style transformer (GPT2LMHeadModel, so every saelab command works on "
                          "it) with AdamW and a cosine schedule on random windows of the training text. "
                          "Writes OUT/model/ (float16 weights, tokenizer, lm.json with the held-out loss). "
                          "Re-running the same command resumes from OUT/checkpoint.pt; the same seed on the "
                          "same machine gives the same model.")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    add_arguments(p, LMConfig, group_title="model and training options")
    p.set_defaults(func=_lm_train, writes="folder")

    p = sub.add_parser("toy", help="the 2022 superposition benchmark sweep",
                       description="Train ReLU-L1 (L1 coefficient x dictionary ratio) and TopK "
                       "(k x ratio) SAEs on synthetic data with known features; write a CSV, "
                       "MMCS heat maps and a summary.")
    p.add_argument("--out", type=Path, default=Path("runs/toy"), help="output folder [default: runs/toy]")
    p.add_argument("--quick", action="store_true", help="a smaller sweep (about a minute); flags given "
                   "beat it")
    add_arguments(p, ToySweepConfig, exclude={"data"}, group_title="sweep options")
    p.set_defaults(func=_toy, writes="folder")
    return parser


def _run(args: argparse.Namespace) -> int:
    """Run the command; one that writes an output holds it (saelab.outputs.claim) while it runs,
    and a file-system error becomes one line naming the path."""
    from saelab.outputs import claim, held_by_this_rank, os_error

    writes = getattr(args, "writes", None)
    try:
        if writes is None or not held_by_this_rank():
            return int(args.func(args))
        words = " ".join(w for w in (args.command, getattr(args, f"{args.command}_command", None)) if w)
        with claim(args.out, writes, words):
            return int(args.func(args))
    except OSError as e:
        raise os_error(e) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["atlas", "export-html"]:
        argv = ["export-html", *argv[2:]]
    args = parser.parse_args(argv)
    if args.command == "demo" and args.out is None:
        args.out = Path("runs/demo-quick" if args.quick else "runs/demo")
    try:
        return _run(args)
    except SaelabError as e:
        print(f"saelab {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nsaelab {args.command}: interrupted; files on disk are complete "
              "(re-run the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
