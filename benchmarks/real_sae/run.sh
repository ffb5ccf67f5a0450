#!/usr/bin/env bash
# The README's real-model results, end to end. Every step resumes if re-run.
#   bash benchmarks/real_sae/run.sh            (about 110 minutes on 2 CPU cores)
# Writes runs/ (stores, SAEs, the atlas) and benchmarks/real_sae/*.json, frontier.png, frontier.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
S=.venv/bin/saelab
OUT=benchmarks/real_sae
CORPUS=python-docs+python-stdlib
HOOK=blocks.6.hook_resid_post
# once FILE CMD...: run CMD into FILE unless FILE is already there (so a re-run resumes cheaply)
once() { local f=$1; shift; [ -s "$f" ] || { "$@" > "$f.tmp" && mv "$f.tmp" "$f"; }; }

# 1. SmolLM2-135M: 4.2M train tokens and 200k held-out tokens of python docs + stdlib.
$S harvest --model smollm2-135m --hook $HOOK --corpus $CORPUS --tokens 4200000 --out runs/smol-l6
$S harvest --model smollm2-135m --hook $HOOK --corpus $CORPUS --tokens 200000 --split heldout \
    --out runs/smol-l6-heldout

# 2. The headline TopK SAE on all 4.2M tokens: 16x, k = 32.
$S train --acts runs/smol-l6 --arch topk --expansion-factor 16 --k 32 --tokens 4200000 \
    --out runs/smol-topk-k32
once $OUT/smol-topk-k32.splice.json $S eval runs/smol-topk-k32 --tokens 8192 --json

# 3. ReLU-L1 beside it: same tokens and batch, L1 coefficient 3 (chosen from a 400k-token
#    probe), LR 1e-3 (the TopK default LR leaves ReLU far from sparse in 1,025 steps). It
#    lands below L0 = 32, so a TopK SAE with k = the ReLU SAE's held-out L0 makes the
#    matched-L0 pair; the frontier below compares the two across L0.
$S train --acts runs/smol-l6 --arch relu --expansion-factor 16 --l1-coefficient 3 --lr 1e-3 \
    --tokens 4200000 --out runs/smol-relu-l1-3
once $OUT/smol-relu-l1-3.splice.json $S eval runs/smol-relu-l1-3 --tokens 8192 --json
for r in smol-topk-k32 smol-relu-l1-3; do
  once $OUT/$r.heldout.json $S eval runs/$r --acts runs/smol-l6-heldout --json
done
K=$(.venv/bin/python -c "import json; print(round(json.load(open('$OUT/smol-relu-l1-3.heldout.json'))['l0']))")
$S train --acts runs/smol-l6 --arch topk --expansion-factor 16 --k $K --tokens 4200000 \
    --out runs/smol-topk-matched
once $OUT/smol-topk-matched.splice.json $S eval runs/smol-topk-matched --tokens 8192 --json
once $OUT/smol-topk-matched.heldout.json $S eval runs/smol-topk-matched --acts runs/smol-l6-heldout --json

# 4. The reconstruction-sparsity frontier: 1M tokens per point, batch 1024, FVU and L0 on
#    the 200k held-out rows.
for k in 16 32 64; do
  $S train --acts runs/smol-l6 --arch topk --expansion-factor 16 --k $k --tokens 1000000 \
      --batch-size 1024 --out runs/frontier/topk-k$k --no-progress
  once $OUT/frontier-topk-k$k.json $S eval runs/frontier/topk-k$k --acts runs/smol-l6-heldout --json
done
for l1 in 1.5 3 6; do
  $S train --acts runs/smol-l6 --arch relu --expansion-factor 16 --l1-coefficient $l1 --lr 1e-3 \
      --tokens 1000000 --batch-size 1024 --out runs/frontier/relu-l1-$l1 --no-progress
  once $OUT/frontier-relu-l1-$l1.json $S eval runs/frontier/relu-l1-$l1 --acts runs/smol-l6-heldout --json
done

# 5. MiniLM-L6 (an encoder: embedding cosine instead of CE).
$S harvest --model minilm-l6 --hook blocks.3.hook_resid_post --corpus $CORPUS --tokens 1000000 \
    --context-length 128 --out runs/minilm-l3
$S train --acts runs/minilm-l3 --arch topk --expansion-factor 16 --k 32 --tokens 1000000 \
    --batch-size 1024 --out runs/minilm-topk-k32
once $OUT/minilm-topk-k32.splice.json $S eval runs/minilm-topk-k32 --tokens 8192 --context-length 128 --json

.venv/bin/python $OUT/frontier.py

# 6. The feature atlas of the headline SAE (all held-out tokens, up to 1M), for `saelab serve`.
[ -s runs/smol-topk-k32.atlas ] || $S atlas runs/smol-topk-k32 --out runs/smol-topk-k32.atlas
