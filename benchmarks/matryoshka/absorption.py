"""Feature absorption on toy data with a known hierarchy: TopK, BatchTopK and Matryoshka
BatchTopK on the same rows.

The data (saelab.data.toy): 256 true features in 64 dimensions; 16 of them are parents with 4
children each, and a child fires only when its parent fires (one child of a firing parent, with
probability 0.9). Each SAE has 512 latents (2x) and k = 6, 1M training rows, the same seed.

- parents recovered: share of parent directions with a decoder row at cosine > 0.9;
- children recovered: the same for the children;
- absorption: share of children whose best-matching latent (highest decoder cosine with the
  child) leans toward its parent, cosine with the parent's direction > 0.3 (a child direction
  and its parent's are independent random directions: |cos| ~ 0.13 by chance at d = 64);
- MMCS over all 256 features, and FVU on 20,000 held-out rows.

    python benchmarks/matryoshka/absorption.py     # about 10 min on 2 cores; results.md/.json
    python benchmarks/matryoshka/absorption.py --tokens 4000000 --seeds 0 --name results-4m
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from saelab import train_sae
from saelab.activations.source import MatrixSource
from saelab.data.toy import ToyDataConfig, make_toy_data
from saelab.eval.metrics import evaluate_reconstruction, mmcs

HERE = Path(__file__).parent
LEAN = 0.3
SEEDS = (0, 1, 2)
DATA = ToyDataConfig(d_in=64, n_features=256, avg_active=5, hierarchy_parents=16, children_per_parent=4,
                     child_probability=0.9, seed=11)
ARCHS = {"topk": {}, "batchtopk": {}, "matryoshka": {}}
TRAIN = dict(n_latents=512, k=6, tokens=1_000_000, batch_size=1024, lr=3e-3, progress=False)


def scores(w_dec: torch.Tensor, data) -> dict[str, float]:
    dirs = w_dec / w_dec.norm(dim=1, keepdim=True)
    cos = data.features @ dirs.T  # [features, latents]
    best = cos.max(1).values
    parents, children = data.parents, data.children
    child_best = cos[children.flatten()].argmax(1)  # [P*C] latent that best matches each child
    parent_of = parents.repeat_interleave(children.shape[1])
    lean = (dirs[child_best] * data.features[parent_of]).sum(1)
    return {
        "parents_recovered": float((best[parents] > 0.9).float().mean()),
        "children_recovered": float((best[children.flatten()] > 0.9).float().mean()),
        "absorption": float((lean > LEAN).float().mean()),
        "mmcs": mmcs(w_dec, data.features)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=TRAIN["tokens"], help="training rows per SAE")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
    parser.add_argument("--name", default="results", help="results file name (.md and .json)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    TRAIN["tokens"] = args.tokens
    torch.manual_seed(0)
    data = make_toy_data(DATA)
    x, _ = data.sample(200_000, seed=1)
    held, _ = data.sample(20_000, seed=2)
    runs = []
    for arch, extra in ARCHS.items():
        for seed in seeds:
            t0 = time.perf_counter()
            sae = train_sae(x, architecture=arch, seed=seed, **TRAIN, **extra)
            m = evaluate_reconstruction(sae, MatrixSource(held).rows(4096))
            runs.append({"architecture": arch, "seed": seed, **scores(sae.W_dec.detach(), data),
                         "fvu": m.fvu, "l0": m.l0, "seconds": time.perf_counter() - t0})
            print(json.dumps(runs[-1]))
    keys = ("parents_recovered", "children_recovered", "absorption", "mmcs", "fvu", "l0")
    table = ["| SAE (512 latents, k 6) | parents recovered | children recovered | children absorbing "
             "their parent | MMCS | held-out FVU | L0 |", "|---|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for arch in ARCHS:
        rs = [r for r in runs if r["architecture"] == arch]
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in keys}
        summary[arch] = mean
        pct = {k: f"{100 * mean[k]:.0f}%" for k in ("parents_recovered", "children_recovered", "absorption")}
        table.append(f"| {arch} | {pct['parents_recovered']} | {pct['children_recovered']} | "
                     f"{pct['absorption']} | {mean['mmcs']:.3f} | {mean['fvu']:.3f} | {mean['l0']:.1f} |")
    text = "\n".join([
        "# Feature absorption: TopK, BatchTopK, Matryoshka BatchTopK on hierarchical toy data", "",
        f"Made by `{' '.join(['python', 'benchmarks/matryoshka/absorption.py', *sys.argv[1:]])}` "
        f"(means over seeds {', '.join(map(str, seeds))}).",
        "", f"Data: {DATA.model_dump()}", f"Training: {TRAIN}", "",
        f"A child absorbs its parent when the latent that best matches the child has decoder cosine > {LEAN} "
        "with the parent's direction. Matryoshka's groups are its default (5 groups, each twice the one "
        "before: 17, 33, 66, 132, 264 latents).", "", *table, ""])
    (HERE / f"{args.name}.md").write_text(text)
    (HERE / f"{args.name}.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
