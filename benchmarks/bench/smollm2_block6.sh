#!/usr/bin/env bash
# The report card of five architectures at equal size on SmolLM2-135M blocks.6.hook_resid_post:
# each trained with its own defaults on the demo's store (800,000 rows of python-docs+python-stdlib,
# 8x = 4,608 latents, k = 32 where it has one), then `saelab bench` on all of them.
#   make demo DEMO_ARGS=--no-serve      (makes the store, once)
#   bash benchmarks/bench/smollm2_block6.sh
# Writes runs/bench-smol/ (the SAEs) and benchmarks/bench/smollm2/ (cards, bench.csv/md/png).
set -euo pipefail
cd "$(dirname "$0")/../.."
S=.venv/bin/saelab
STORE=$(ls -d runs/demo/store-smollm2-135m-blocks.6.hook_resid_post-* | head -1)
for arch in topk batchtopk matryoshka jumprelu relu; do
  k=(); case $arch in topk|batchtopk|matryoshka) k=(--k 32);; esac
  /usr/bin/time -f "$arch trained in %e s" $S train --acts "$STORE" --arch $arch --expansion-factor 8 "${k[@]}" \
      --tokens 800000 --out runs/bench-smol/$arch --no-progress
done
/usr/bin/time -f "bench in %e s" $S bench runs/bench-smol/{topk,batchtopk,matryoshka,jumprelu,relu} \
    --out benchmarks/bench/smollm2 --no-progress
