#!/usr/bin/env bash
# The README's real-model results, end to end. Every step resumes if re-run.
#   bash benchmarks/real_sae/run.sh            (about 90 minutes on 2 CPU cores)
# Writes runs/ (stores, SAEs) and benchmarks/real_sae/*.json, frontier.png, results.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
S=.venv/bin/saelab
OUT=benchmarks/real_sae
CORPUS=python-docs+python-stdlib
HOOK=blocks.6.hook_resid_post

# 1. SmolLM2-135M: 4.2M train tokens and 200k held-out tokens of python docs + stdlib.
$S harvest --model smollm2-135m --hook $HOOK --corpus $CORPUS --tokens 4200000 --out runs/smol-l6
$S harvest --model smollm2-135m --hook $HOOK --corpus $CORPUS --tokens 200000 --split heldout \
    --out runs/smol-l6-heldout

# 2. The headline TopK SAE on all 4.2M tokens: 16x, k = 32.
$S train --acts runs/smol-l6 --arch topk --expansion-factor 16 --k 32 --tokens 4200000 \
    --out runs/smol-topk-k32
$S eval runs/smol-topk-k32 --tokens 8192 --json > $OUT/smol-topk-k32.splice.json

# 3. The reconstruction-sparsity frontier: 1M tokens per point, FVU and L0 on held-out rows.
for k in 8 16 32 64; do
  $S train --acts runs/smol-l6 --arch topk --expansion-factor 16 --k $k --tokens 1000000 \
      --out runs/frontier/topk-k$k --no-progress
  $S eval runs/frontier/topk-k$k --acts runs/smol-l6-heldout --json > $OUT/frontier-topk-k$k.json
done
for l1 in ${L1S:-1 2 4 8}; do
  $S train --acts runs/smol-l6 --arch relu --expansion-factor 16 --l1-coefficient $l1 --tokens 1000000 \
      --out runs/frontier/relu-l1-$l1 --no-progress
  $S eval runs/frontier/relu-l1-$l1 --acts runs/smol-l6-heldout --json > $OUT/frontier-relu-l1-$l1.json
done

# 4. ReLU-L1 on all 4.2M tokens at the TopK SAE's L0 (its coefficient read off the sweep).

L1=${L1_MATCHED:-$(.venv/bin/python $OUT/frontier.py --matched-l1 32)}
$S train --acts runs/smol-l6 --arch relu --expansion-factor 16 --l1-coefficient $L1 --tokens 4200000 \
    --out runs/smol-relu-matched
$S eval runs/smol-relu-matched --tokens 8192 --json > $OUT/smol-relu-matched.splice.json
for r in smol-topk-k32 smol-relu-matched; do
  $S eval runs/$r --acts runs/smol-l6-heldout --json > $OUT/$r.heldout.json
done

# 5. MiniLM-L6 (an encoder: embedding cosine instead of CE).
$S harvest --model minilm-l6 --hook blocks.3.hook_resid_post --corpus $CORPUS --tokens 1000000 \
    --context-length 128 --out runs/minilm-l3
$S train --acts runs/minilm-l3 --arch topk --expansion-factor 16 --k 32 --tokens 1000000 \
    --out runs/minilm-topk-k32
$S eval runs/minilm-topk-k32 --tokens 8192 --context-length 128 --json > $OUT/minilm-topk-k32.splice.json

.venv/bin/python $OUT/frontier.py
