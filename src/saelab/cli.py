"""The ``saelab`` command: a thin layer over the library.

Flags for training are generated from :class:`saelab.config.TrainConfig`, so ``--help``
shows the same descriptions and defaults the library uses. User mistakes end in one line
on stderr and exit status 1 (argparse's own usage errors: 2); Ctrl-C exits 130 and a
re-run of the same command resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from saelab.errors import SaelabError


def _train(args: argparse.Namespace) -> int:
    from saelab.activations.source import load_matrix
    from saelab.config import TrainConfig, from_args
    from saelab.eval.metrics import evaluate_reconstruction
    from saelab.train.trainer import Trainer

    cfg = from_args(TrainConfig, args)
    source = load_matrix(args.acts, drop_nonfinite=cfg.drop_nonfinite)
    print(f"training {cfg.architecture} SAE on {source.describe()} -> {args.out}", file=sys.stderr)
    t0 = time.perf_counter()
    sae = Trainer(source, cfg, args.out).run()
    rows = min(source.n_rows, 100_000)
    m = evaluate_reconstruction(sae, source.rows(8192, limit=rows))
    print(f"done in {time.perf_counter() - t0:.1f} s; on the first {rows:,} rows (training data): "
          f"FVU {m.fvu:.4f}, L0 {m.l0:.1f}, dead {100 * m.dead_fraction:.1f}%", file=sys.stderr)
    print(f"saved {args.out}/cfg.json and sae_weights.safetensors")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from saelab.activations.source import load_matrix
    from saelab.errors import InputError
    from saelab.eval.metrics import evaluate_reconstruction
    from saelab.sae.base import SAE

    sae = SAE.load(args.sae_dir)
    source = load_matrix(args.acts, drop_nonfinite=args.drop_nonfinite)
    if source.d_in != sae.d_in:
        raise InputError(
            f"{args.acts} has width {source.d_in} but the SAE in {args.sae_dir} reads d_in = "
            f"{sae.d_in}; evaluate it on activations from its hook ({sae.cfg.hook_name or 'unknown'})"
        )
    m = evaluate_reconstruction(sae, source.rows(args.batch_size, limit=args.max_rows))
    result = {"sae": str(args.sae_dir), "acts": str(args.acts),
              "architecture": sae.cfg.architecture, "n_latents": sae.n_latents, **m.as_dict()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        rows = [("FVU", f"{m.fvu:.4f}"), ("explained variance", f"{m.explained_variance:.4f}"),
                ("MSE per row", f"{m.mse:.4g}"), ("L0", f"{m.l0:.2f}"),
                ("dead latents", f"{100 * m.dead_fraction:.2f}%"),
                ("dense latents (>10%)", f"{100 * m.dense_fraction:.2f}%"), ("rows", f"{m.rows:,}")]
        print(f"{sae.cfg.architecture} SAE, {sae.n_latents:,} latents, on {args.acts}")
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v:>10}")
    return 0


def _toy(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from saelab.config import build
    from saelab.studies.superposition import ToySweepConfig, run_sweep, sweep_cells, write_outputs

    base = ToySweepConfig.quick() if args.quick else ToySweepConfig()
    overrides = {k: v for k, v in {"tokens": args.tokens, "seed": args.seed}.items() if v}
    cfg = build(ToySweepConfig, **{**base.model_dump(), **overrides})
    bar = tqdm(total=len(sweep_cells(cfg)), unit="sae", desc="toy sweep", dynamic_ncols=True)

    def report(r: dict) -> None:
        bar.set_postfix_str(f"{r['architecture']} {r['param']}={r['value']:g} "
                            f"{r['ratio']:g}x mmcs={r['mmcs']:.3f}")
        bar.update()

    t0 = time.perf_counter()
    results = run_sweep(cfg, on_result=report)
    bar.close()
    out = Path(args.out)
    write_outputs(results, cfg, out)
    print((out / "summary.md").read_text())
    print(f"wrote {out}/sweep.csv, {out}/mmcs_relu.png, {out}/mmcs_topk.png, {out}/summary.md "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from saelab import __version__
    from saelab.config import ARCHITECTURES, TrainConfig, add_arguments

    parser = argparse.ArgumentParser(
        prog="saelab", description="Sparse autoencoders on neural-network activations.")
    parser.add_argument("--version", action="version", version=f"saelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train an SAE on an activation matrix",
                       description="Train an SAE on a .npy or .safetensors activation matrix "
                       "[rows, d_in]. Re-running with the same --out resumes an interrupted run.")
    p.add_argument("--acts", required=True, type=Path, help="activation matrix (.npy or .safetensors)")
    p.add_argument("--out", required=True, type=Path, help="output folder (SAE, checkpoint, metrics.jsonl)")
    p.add_argument("--arch", dest="architecture", choices=ARCHITECTURES, default=None,
                   help="SAE architecture [default: topk]")
    add_arguments(p, TrainConfig, exclude={"architecture"}, group_title="training options")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="measure an SAE on activations",
                       description="FVU, explained variance, L0, dead and dense latents of an SAE.")
    p.add_argument("sae_dir", type=Path, help="SAE folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("--acts", required=True, type=Path, help="activation matrix (.npy or .safetensors)")
    p.add_argument("--max-rows", type=int, default=None, help="evaluate at most this many rows")
    p.add_argument("--batch-size", type=int, default=8192, help="rows per batch [default: 8192]")
    p.add_argument("--drop-nonfinite", action="store_true", help="skip rows with NaN/Inf")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=_eval)

    p = sub.add_parser("toy", help="the 2022 superposition benchmark sweep",
                       description="Train ReLU-L1 (L1 coefficient x dictionary ratio) and TopK "
                       "(k x ratio) SAEs on synthetic data with known features; write a CSV, "
                       "MMCS heat maps and a summary.")
    p.add_argument("--out", type=Path, default=Path("runs/toy"), help="output folder [default: runs/toy]")
    p.add_argument("--quick", action="store_true", help="a smaller sweep (about a minute)")
    p.add_argument("--tokens", type=int, default=None, help="training rows per SAE")
    p.add_argument("--seed", type=int, default=None, help="training seed")
    p.set_defaults(func=_toy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SaelabError as e:
        print(f"saelab {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nsaelab {args.command}: interrupted; files on disk are complete "
              "(re-run the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
