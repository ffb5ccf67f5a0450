"""SmolLM2-135M block 6: an SAE on the MLP's output against a transcoder and a skip-transcoder
that read the MLP's input, at equal dictionary size and L0.

1. harvest `blocks.6.ln2.hook_normalized` (the MLP's input) and `blocks.6.hook_mlp_out` in one
   pass over the training documents of python-docs+python-stdlib (row-aligned pairs);
2. train a TopK SAE on `hook_mlp_out`, a transcoder and a skip-transcoder (ln2 -> mlp_out), each
   4,608 latents (8x), k = 32, the same tokens, seed and learning rate;
3. splice each into the model in place of the MLP's output on held-out documents: FVU of the MLP
   output, L0, dead latents, CE loss recovered (zero and mean ablation of the MLP output).

    python benchmarks/transcoders/block6.py     # measured here: the harvest 13 min (beside another
                                                # benchmark), then 7 min; reuses runs/transcoders
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from saelab import stage
from saelab.activations.harvest import harvest
from saelab.activations.source import open_pairs, open_source
from saelab.config import HarvestConfig, TextConfig
from saelab.eval.splice import splice_eval
from saelab.models import open_model
from saelab.sae.base import SAE
from saelab.train.config import TrainConfig
from saelab.train.trainer import Trainer

HERE = Path(__file__).parent
IN, OUT = "blocks.6.ln2.hook_normalized", "blocks.6.hook_mlp_out"
CORPUS = "python-docs+python-stdlib"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=400_000, help="harvested and training rows")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens spliced")
    parser.add_argument("--runs", type=Path, default=Path("runs/transcoders"), help="work folder")
    args = parser.parse_args()
    lm = open_model("smollm2-135m")
    t0 = time.perf_counter()
    harvest(HarvestConfig(model="smollm2-135m", hooks=[IN, OUT], corpus=CORPUS, tokens=args.tokens,
                          progress=False), args.runs / "store", lm=lm)
    harvest_s = time.perf_counter() - t0
    common = dict(n_latents=4608, k=32, tokens=args.tokens, batch_size=4096, lr=1e-3, seed=0, progress=False,
                  model_name="smollm2-135m")
    coders = {
        "SAE on hook_mlp_out": (open_source(args.runs / "store" / OUT),
                                TrainConfig(architecture="topk", hook_name=OUT, **common)),
        "transcoder (ln2 -> mlp_out)": (open_pairs(args.runs / "store" / IN, args.runs / "store" / OUT),
                                        TrainConfig(architecture="transcoder", **common)),
        "skip-transcoder (ln2 -> mlp_out)": (open_pairs(args.runs / "store" / IN, args.runs / "store" / OUT),
                                             TrainConfig(architecture="transcoder", skip=True, **common)),
    }
    text = TextConfig(corpus=CORPUS)
    rows = []
    for (name, (source, cfg)), folder in zip(coders.items(), ("sae", "transcoder", "skip-transcoder"),
                                             strict=True):
        t = time.perf_counter()
        Trainer(source, cfg, args.runs / folder).run()
        # the training run's own time (a finished run is reused, not trained again)
        marker = stage.read_marker(args.runs / folder) or {}
        train_s = float(marker.get("seconds") or time.perf_counter() - t)
        coder = SAE.load(args.runs / folder)
        t = time.perf_counter()
        r = splice_eval(coder, lm, text, tokens=args.eval_tokens, hook=coder.cfg.hook_name, progress=False)
        rows.append({"coder": name, "folder": folder, "fvu_mlp_out": r.fvu, "l0": r.l0,
                     "dead_fraction": r.dead_fraction, "ce_clean": r.ce_clean, "ce_spliced": r.ce_spliced,
                     "ce_zero": r.ce_zero, "ce_zero_sae_positions": r.ce_zero_sae_positions,
                     "ce_mean": r.ce_mean, "ce_recovered": r.ce_recovered,
                     "ce_recovered_sae_positions": r.ce_recovered_sae_positions,
                     "ce_recovered_mean": r.ce_recovered_mean, "tokens": r.tokens, "train_s": train_s,
                     "eval_s": time.perf_counter() - t})
        print(json.dumps(rows[-1]), flush=True)
    table = ["| coder (4,608 latents, k 32) | FVU of the MLP output | L0 | dead | CE spliced | "
             "CE loss recovered (zero every position / zero the MLP's positions / mean) | train |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['coder']} | {r['fvu_mlp_out']:.3f} | {r['l0']:.1f} | "
                     f"{100 * r['dead_fraction']:.1f}% | {r['ce_spliced']:.3f} | "
                     f"{r['ce_recovered']:.3f} / {r['ce_recovered_sae_positions']:.3f} / "
                     f"{r['ce_recovered_mean']:.3f} | "
                     f"{r['train_s']:.0f} s |")
    r0 = rows[0]
    text_md = "\n".join([
        "# SmolLM2-135M block 6: SAE on the MLP output vs transcoder vs skip-transcoder", "",
        f"Made by `{' '.join(['python', 'benchmarks/transcoders/block6.py', *sys.argv[1:]])}`: "
        f"{args.tokens:,} training rows of {CORPUS} harvested in one pass for both hooks (this run: "
        f"{harvest_s:.0f} s; a store already there is reused), each coder trained on them with the same "
        "settings, then spliced in place of "
        f"the MLP output on {r0['tokens']:,} held-out tokens (CE clean {r0['ce_clean']:.3f}; MLP output "
        f"zero-ablated at every position {r0['ce_zero']:.3f}, at the coder's positions "
        f"{r0['ce_zero_sae_positions']:.3f}; mean-ablated {r0['ce_mean']:.3f}). The first CE loss recovered "
        "is SAELens/SAEBench's convention (the zero ablation takes every position, BOS included), the "
        "second saelab 0.5's (it takes the positions the coder reads: BOS excluded); the reconstruction "
        "replaces those positions in both.", "", *table, ""])
    (HERE / "results.md").write_text(text_md)
    (HERE / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text_md)


if __name__ == "__main__":
    main()
