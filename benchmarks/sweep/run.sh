#!/usr/bin/env bash
# The committed TopK sweep on SmolLM2-135M blocks.6.hook_resid_post: 3 dictionary sizes x 4 k,
# 12 SAEs trained on one pass over the demo's 800k-row store, measured on held-out rows.
# Needs the store `make demo` builds (runs/demo/store-*); about 15 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
STORE=$(ls -d runs/demo/store-smollm2-135m-blocks.6.hook_resid_post-* | head -1)
.venv/bin/saelab harvest --model smollm2-135m --hook blocks.6.hook_resid_post \
    --corpus python-docs+python-stdlib --split heldout --tokens 100000 --out runs/sweep-heldout
.venv/bin/saelab sweep --acts "$STORE" --eval-acts runs/sweep-heldout --out runs/sweep \
    --grid-n-latents 1152,2304,4608 --grid-k 8,16,32,64 --tokens 800000 --lr 1e-3
cp runs/sweep/sweep.csv runs/sweep/scaling.json runs/sweep/frontier.png runs/sweep/scaling.png benchmarks/sweep/
# benchmarks/sweep/results.md describes these figures; update it by hand after a re-run.
