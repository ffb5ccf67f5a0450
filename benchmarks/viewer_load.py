"""Viewer under load: 50 concurrent clients on loopback for 30 s against feature pages of a
65,536-feature atlas, then the feature list and the live text box.

    python benchmarks/viewer_load.py [--tokens 65536] [--connections 50] [--duration 30]

1. Unless runs/bench-65k.atlas exists: a TopK SAE with 65,536 latents (k = 32, random
   unit-norm dictionary: the load test needs the atlas's shape, not trained features) on
   SmolLM2-135M blocks.6.hook_resid_post, and its atlas over ``--tokens`` held-out tokens
   (so a feature has ~32 firings and full example lists). Build time and tokens/s recorded.
2. `saelab serve ATLAS` in its own process (one uvicorn worker; the live model loaded).
3. wrk (Debian's `wrk`, C, 2 threads) with ``--connections`` keep-alive connections for
   ``--duration`` seconds, each request a uniformly random feature page, as a browser asks
   for it (Accept-Encoding: gzip). Then the same against the feature list endpoint, and
   POSTs of a one-sentence text to the live text box.

The load generator shares the 2 CPU cores with the server, so these are conservative.
Results go to benchmarks/viewer_load.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

LIVE_TEXT = ("The function returns a list of the values that were found in the table, "
             "sorted by their keys, or None when the table is empty.")
HERE = Path(__file__).parent
ROOT = HERE.parent
LUA = """
local n = {n}
local path = "{path}"
local body = {body}
request = function()
  if body then
    return wrk.format("POST", path, {{["Content-Type"] = "application/json"}}, body)
  end
  local p = path
  if n > 0 then p = p .. math.random(0, n - 1) end
  return wrk.format("GET", p, {{["Accept-Encoding"] = "gzip"}})
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {{"requests": %d, "duration_s": %.3f, "errors": %d, "non_2xx": %d, ' ..
    '"p50_ms": %.2f, "p90_ms": %.2f, "p95_ms": %.2f, "p99_ms": %.2f, "max_ms": %.2f}}\\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(95) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3))
end
"""


def build(tokens: int, atlas: Path) -> dict:
    from saelab.analyse.atlas import build_atlas
    from saelab.config import AtlasConfig
    from saelab.sae.base import create
    from saelab.sae.config import SAEConfig

    sae_dir = ROOT / "runs" / "bench-65k-sae"
    sae = create(
        SAEConfig(
            architecture="topk",
            d_in=576,
            n_latents=65536,
            k=32,
            hook_name="blocks.6.hook_resid_post",
            model_name="smollm2-135m",
        )
    )
    sae.init_weights(torch.Generator().manual_seed(0))
    sae.save(sae_dir)
    r = build_atlas(sae_dir, AtlasConfig(tokens=tokens, eval_tokens=0), atlas)
    return {
        "features": r.features,
        "tokens": r.tokens,
        "seconds": r.seconds,
        "pass_tokens_per_s": r.tokens_per_s,
        "atlas_mib": atlas.stat().st_size / 2**20,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrk(url: str, path: str, n: int, connections: int, duration: int, body: str | None = None,
        timeout: int = 10) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA.format(n=n, path=path, body="nil" if body is None else json.dumps(body)))
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--timeout", f"{timeout}s", "-s", f.name, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    Path(f.name).unlink()
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    res = json.loads(line.removeprefix("RESULT "))
    res["requests_per_s"] = res["requests"] / res["duration_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--duration", type=int, default=30)
    ap.add_argument("--atlas", type=Path, default=ROOT / "runs" / "bench-65k.atlas")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("needs Debian's wrk: apt-get install wrk")
    res: dict = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "connections": args.connections,
        "duration_s": args.duration,
    }
    if not args.atlas.exists():
        print("building the 65k-feature atlas ...", file=sys.stderr)
        res["build"] = build(args.tokens, args.atlas)
    from saelab.analyse.atlasdb import Atlas

    n = Atlas(args.atlas).n_features
    res["features"] = n
    res["atlas_mib"] = args.atlas.stat().st_size / 2**20
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "saelab", "serve", str(args.atlas), "--port", str(port), "--device", "cpu"],
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(1200):
            try:
                urllib.request.urlopen(url + "/api/meta", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        print("load: feature pages ...", file=sys.stderr)
        res["feature_pages"] = wrk(url, "/api/feature/", n, args.connections, args.duration)
        print("load: feature list ...", file=sys.stderr)
        res["feature_list"] = wrk(
            url, "/api/features?sort=density&order=desc&limit=50", 0, args.connections, min(args.duration, 10)
        )
        # The live text box: the model and SAE on each request's text, one request at a time
        # (the server queues the rest), so latency grows with the queue of 50 clients.
        print("load: live text box ...", file=sys.stderr)
        meta = json.load(urllib.request.urlopen(url + "/api/meta", timeout=10))
        assert meta["live"], meta.get("live_error")
        res["live_text"] = wrk(url, "/api/live", 0, args.connections, min(args.duration, 20),
                               body=json.dumps({"text": LIVE_TEXT}), timeout=30)
        res["live_text"]["text_characters"] = len(LIVE_TEXT)
    finally:
        server.terminate()
        server.wait(10)
    (HERE / "viewer_load.json").write_text(json.dumps(res, indent=2) + "\n")
    fp, fl, lt = res["feature_pages"], res["feature_list"], res["live_text"]
    md = f"""# Viewer under load

`python benchmarks/viewer_load.py` on {res["machine"]}: `saelab serve` (one uvicorn worker) and
wrk (2 threads) on the same 2 cores, {args.connections} keep-alive connections on loopback.
Atlas: {n:,} features ({res["atlas_mib"]:,.0f} MiB).

| endpoint | duration | requests/s | p50 | p95 | p99 | max | errors / non-2xx |
|---|---:|---:|---:|---:|---:|---:|---:|
| `GET /api/feature/<random id>` (gzip) | {fp["duration_s"]:.0f} s | {fp["requests_per_s"]:,.0f} | \
{fp["p50_ms"]:.1f} ms | \
**{fp["p95_ms"]:.1f} ms** | {fp["p99_ms"]:.1f} ms | {fp["max_ms"]:.0f} ms | {fp["errors"]} / {fp["non_2xx"]} |
| `GET /api/features?sort=density` (50 rows) | {fl["duration_s"]:.0f} s | {fl["requests_per_s"]:,.0f} | \
{fl["p50_ms"]:.1f} ms | {fl["p95_ms"]:.1f} ms | {fl["p99_ms"]:.1f} ms | {fl["max_ms"]:.0f} ms | \
{fl["errors"]} / {fl["non_2xx"]} |
| `POST /api/live` ({lt["text_characters"]} characters) | {lt["duration_s"]:.0f} s | \
{lt["requests_per_s"]:,.1f} | {lt["p50_ms"]:.0f} ms | **{lt["p95_ms"]:.0f} ms** | {lt["p99_ms"]:.0f} ms | \
{lt["max_ms"]:.0f} ms | {lt["errors"]} / {lt["non_2xx"]} |

The live text box runs SmolLM2-135M and the SAE on each request, one at a time (the others
wait, up to 10 s, then get 503): with {args.connections} clients its latency is the queue's, about
{args.connections} / requests-per-second.
"""
    if "build" in res:
        b = res["build"]
        md += (
            f"\nThe atlas build (random 65,536-latent TopK SAE, {b['tokens']:,} held-out tokens): "
            f"{b['seconds']:.0f} s in all, {b['pass_tokens_per_s']:,.0f} tokens/s in the streaming pass.\n"
        )
    (HERE / "viewer_load.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
