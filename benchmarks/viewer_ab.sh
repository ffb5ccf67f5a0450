#!/usr/bin/env bash
# The viewer's feature pages under the same wrk load at two commits, on this machine:
#   bash benchmarks/viewer_ab.sh OLD_COMMIT [ATLAS]
# (wrk 2 threads, 50 connections, 20 s of random feature pages, --no-live; the atlas is
# the one benchmarks/viewer_load.py builds). Prints requests/s and latency percentiles.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?give the commit to compare with}
ATLAS=${2:-runs/bench-65k.atlas}
N=$(.venv/bin/python -c "from saelab.analyse.atlasdb import Atlas; print(Atlas('$ATLAS').n_features)")
WT=$(mktemp -d)
git worktree add -f "$WT" "$OLD" -q
trap 'git worktree remove --force "$WT"' EXIT
LUA=$(mktemp --suffix .lua)
echo "request = function() return wrk.format(\"GET\", \"/api/feature/\" .. math.random(0, $((N - 1))), {[\"Accept-Encoding\"] = \"gzip\"}) end" > "$LUA"
for side in "$OLD:$WT/src" "HEAD:$PWD/src"; do
  PORT=$((8800 + RANDOM % 100))
  PYTHONPATH=${side#*:} .venv/bin/python -m saelab serve "$ATLAS" --no-live --port $PORT 2>/dev/null &
  PID=$!
  for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$PORT/api/meta" && break; sleep 0.3; done
  echo "== ${side%%:*}"
  wrk -t2 -c50 -d20s --latency -s "$LUA" "http://127.0.0.1:$PORT" | grep -E "Requests/sec|50%|90%|99%|Non-2xx|Socket"
  kill $PID; wait $PID 2>/dev/null || true
done
