"""saelab against SAELens, EleutherAI sparsify and dictionary_learning, side by side.

    bash benchmarks/peers/setup.sh          # one venv per peer (torch 2.13.0 in each)
    python benchmarks/peers/bench.py [--tokens 163840] [--repeats 2]

Makes cached synthetic activations (d_in 768: sparse non-negative combinations of 16,384
random unit directions plus noise), then trains each library's TopK SAE (24,576 latents,
k 32, batch 4096) on the same rows in the same order, alternating the libraries within each
repeat, each in its own process and virtual environment (benchmarks/peers/run_one.py).
Reports the median tokens/s, peak RSS, held-out FVU and dead %, and each library's
fraction of the float32 encoder floor: 2·d_in·n_latents FLOPs per token at this machine's
measured float32 matmul rate. Writes benchmarks/peers/results.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
VENVS = {
    "saelab": ROOT / ".venv",
    "saelab-bf16": ROOT / ".venv",
    "sparsify": HERE / ".venvs" / "sparsify",
    "dictlearn": HERE / ".venvs" / "dictlearn",
    "saelens": HERE / ".venvs" / "saelens",
}
NAMES = {
    "saelab": "saelab (float32)",
    "saelab-bf16": "saelab (bf16 matmul, float32 weights)",
    "sparsify": "EleutherAI sparsify 1.3.3",
    "dictlearn": "dictionary_learning 0.1.0",
    "saelens": "SAELens 6.54.12",
}


def feature_dirs(d: int, features: int, seed: int = 0) -> torch.Tensor:
    """The true feature directions: ``features`` random unit vectors in R^d."""
    dirs = torch.randn(features, d, generator=torch.Generator().manual_seed(seed))
    return dirs / dirs.norm(dim=1, keepdim=True)


def make_data(
    path: Path, rows: int, d: int = 768, features: int = 16384, active: int = 16, seed: int = 0,
    dirs_seed: int | None = None,
) -> None:
    """``rows`` sparse non-negative combinations of the true directions plus noise. The rows
    come from ``seed``; the directions from ``dirs_seed`` (default: ``seed``, as the figures in
    results.md were made; the time-to-quality benchmark draws train and held-out rows over
    the same directions)."""
    dirs = feature_dirs(d, features, seed if dirs_seed is None else dirs_seed)
    g = torch.Generator().manual_seed(seed)
    if dirs_seed is None:  # the draw results.md was made with: the rows follow the directions
        torch.randn(features, d, generator=g)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, d))
    for a in range(0, rows, 4096):
        b = min(rows, a + 4096)
        idx = torch.randint(features, (b - a, active), generator=g)
        mag = torch.empty(b - a, active).exponential_(generator=g) * (
            torch.rand(b - a, active, generator=g) < 0.8
        )
        x = torch.einsum("rj,rjd->rd", mag, dirs[idx]) + 0.01 * torch.randn(b - a, d, generator=g)
        out[a:b] = x.numpy()
    out.flush()


def matmul_rate(dtype: torch.dtype, d: int = 768, n: int = 24576, batch: int = 4096) -> float:
    """GFLOP/s of the encoder's matmul shape on this machine (2 threads)."""
    torch.set_num_threads(2)
    a, w = torch.randn(batch, d, dtype=dtype), torch.randn(d, n, dtype=dtype)
    a @ w
    t0, reps = time.perf_counter(), 5
    for _ in range(reps):
        a @ w
    return reps * 2 * batch * d * n / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=163_840)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--libs", default="saelab,saelab-bf16,sparsify,dictlearn,saelens")
    ap.add_argument("--data", type=Path, default=Path("/tmp/saelab-peers"))
    a = ap.parse_args()
    libs = [lib for lib in a.libs.split(",") if (VENVS[lib] / "bin" / "python").exists()]
    missing = sorted(set(a.libs.split(",")) - set(libs))
    if missing:
        print(f"skipping {missing}: run benchmarks/peers/setup.sh", file=sys.stderr)
    a.data.mkdir(parents=True, exist_ok=True)
    train, held = a.data / "train.npy", a.data / "heldout.npy"
    if not train.exists() or np.load(train, mmap_mode="r").shape[0] < a.tokens:
        make_data(train, a.tokens, seed=0)
    if not held.exists():
        make_data(held, 16384, seed=1)
    fp32, bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    floor = fp32 * 1e9 / (2 * 768 * 24576)
    runs: dict[str, list[dict]] = {lib: [] for lib in libs}
    for r in range(a.repeats):
        for lib in libs if r % 2 == 0 else libs[::-1]:  # alternate the order
            cmd = [
                str(VENVS[lib] / "bin" / "python"),
                str(HERE / "run_one.py"),
                lib,
                "--train",
                str(train),
                "--heldout",
                str(held),
                "--tokens",
                str(a.tokens),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{lib} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[lib].append(res)
            print(
                f"repeat {r + 1} {lib}: {res['tokens_per_s']:,.0f} tok/s, FVU {res['fvu']:.4f}, "
                f"dead {100 * res['dead_fraction']:.1f}%, peak RSS {res['peak_rss_mib']:,.0f} MiB",
                flush=True,
            )
    table = []
    for lib, rs in runs.items():
        if not rs:
            continue
        tps = statistics.median(x["tokens_per_s"] for x in rs)
        table.append(
            {
                "lib": lib,
                "name": NAMES[lib],
                "tokens_per_s": tps,
                "runs": [x["tokens_per_s"] for x in rs],
                "peak_rss_mib": max(x["peak_rss_mib"] for x in rs),
                "fvu": rs[-1]["fvu"],
                "dead_fraction": rs[-1]["dead_fraction"],
                "floor_fraction": tps / floor,
            }
        )
    result = {
        "machine": f"{platform.machine()}, 2 threads, torch {torch.__version__}",
        "tokens": a.tokens,
        "d_in": 768,
        "n_latents": 24576,
        "k": 32,
        "batch": 4096,
        "matmul_gflops_fp32": fp32,
        "matmul_gflops_bf16": bf16,
        "floor_tokens_per_s": floor,
        "table": table,
    }
    (HERE / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    fastest_peer = max((t["tokens_per_s"] for t in table if not t["lib"].startswith("saelab")), default=None)
    lines = [
        "# saelab against its peers: TopK SAE training on one CPU",
        "",
        f"`python benchmarks/peers/bench.py` on {result['machine']}: d_in 768, 24,576 latents, k 32, "
        f"batch 4096, {a.tokens:,} tokens ({a.tokens // 4096} steps) of cached synthetic activations, the "
        f"same rows in the same order for every library, {a.repeats} repeats alternating the order "
        "(median tokens/s). FVU and dead % on 16,384 held-out rows.",
        "",
        f"Measured matmul rate (4096x768 @ 768x24,576): float32 {fp32:.0f} GFLOP/s, "
        f"bfloat16 {bf16:.0f} GFLOP/s. Float32 encoder floor: 2·768·24,576 FLOPs per token → "
        f"{floor:,.0f} tokens/s.",
        "",
        "| library | tokens/s | fraction of floor | vs fastest peer | peak RSS | held-out FVU | dead |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in table:
        vs = f"{t['tokens_per_s'] / fastest_peer:.2f}x" if fastest_peer else "–"
        lines.append(
            f"| {t['name']} | {t['tokens_per_s']:,.0f} | {t['floor_fraction']:.2f} | {vs} | "
            f"{t['peak_rss_mib']:,.0f} MiB | {t['fvu']:.4f} | {100 * t['dead_fraction']:.1f}% |"
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
