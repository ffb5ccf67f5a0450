"""How large a TopK dictionary trains in this machine's memory, and the formula behind it.

    python benchmarks/train_memory.py [--d-in 768] [--batch 4096] [--budget-gib 24]

Peak RSS (VmHWM) of fresh processes that train a TopK SAE for 3 steps on random rows, at
several dictionary sizes; a straight-line fit gives the bytes per latent, which the
formula explains:

    float32 parameters W_enc, W_dec:            2·d·n·4 bytes
    their gradients:                            2·d·n·4
    Adam's two moments:                         4·d·n·4
    the batch's dense pre-activations [B, n]:   B·n·4 (the top-k and its backward
                                                 keep a few such buffers at the peak)

so the peak is about (32·d + c·4·B)·n bytes plus a constant (Python, torch, the batch).
The largest n for the budget follows; the last run trains at that size to check it. On a
GPU the same formula holds for its memory (bf16 parameters halve the first three terms;
a smaller batch shrinks the last). Writes benchmarks/train_memory.{json,md}.

Runs are measured with SAELAB_KEEP_FREED_MEMORY=0: a CPU run whose footprint is under half
the available memory also keeps freed blocks between steps (faster, 4-21% more
peak RSS at 16k-65k latents); one near the budget goes without, as measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent

CODE = """
import torch, time
from pathlib import Path
from saelab.activations.source import MatrixSource
from saelab.train.config import TrainConfig
from saelab.train.trainer import Trainer
torch.manual_seed(0)
x = torch.randn({batch} * 3, {d})
cfg = TrainConfig(architecture="topk", n_latents={n}, k=32, tokens={batch} * 3, batch_size={batch},
                  progress=False, checkpoint_every_steps=0)
t0 = time.perf_counter()
Trainer(MatrixSource(x), cfg).run()
status = Path('/proc/self/status').read_text().splitlines()
hwm = [int(l.split()[1]) for l in status if l.startswith('VmHWM')][0]
print('RESULT', hwm / 1024, time.perf_counter() - t0)
"""


def peak(n: int, d: int, batch: int) -> tuple[float, float]:
    # Measured without keeping freed memory between steps (saelab/train/memory.py): a run as
    # large as the budget goes without it anyway, and smaller runs that keep it would bend the fit.
    env = {**os.environ, "SAELAB_KEEP_FREED_MEMORY": "0"}
    out = subprocess.run(
        [sys.executable, "-c", CODE.format(n=n, d=d, batch=batch)], capture_output=True, text=True,
        check=True, env=env,
    ).stdout
    _, mib, seconds = out.strip().splitlines()[-1].split()
    return float(mib), float(seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--budget-gib", type=float, default=24.0)
    ap.add_argument("--sizes", default="16384,32768,65536")
    ap.add_argument("--no-check", action="store_true", help="skip the run at the largest size")
    a = ap.parse_args()
    d, batch = a.d_in, a.batch
    rows = []
    for n in (int(v) for v in a.sizes.split(",")):
        mib, s = peak(n, d, batch)
        rows.append({"n_latents": n, "peak_rss_mib": mib, "seconds": s})
        print(f"n = {n:,}: peak RSS {mib:,.0f} MiB ({s:.0f} s for 3 steps)", flush=True)
    ns = np.array([r["n_latents"] for r in rows], dtype=float)
    mibs = np.array([r["peak_rss_mib"] for r in rows])
    slope, intercept = np.polyfit(ns, mibs, 1)
    per_latent = slope * 2**20
    # keep 10% of the budget free for the OS and the page cache
    largest = int((a.budget_gib * 1024 * 0.9 - intercept) / slope) // 1024 * 1024
    result = {
        "d_in": d,
        "batch": batch,
        "runs": rows,
        "bytes_per_latent": per_latent,
        "constant_mib": intercept,
        "params_grads_adam_bytes_per_latent": 32 * d,
        "dense_buffers_per_latent": (per_latent - 32 * d) / (4 * batch),
        "budget_gib": a.budget_gib,
        "largest_n_latents": largest,
    }
    print(
        f"{per_latent:,.0f} bytes per latent (+ {intercept:,.0f} MiB): 32·d = {32 * d:,} for the "
        f"parameters, gradients and Adam, the rest ≈ {result['dense_buffers_per_latent']:.1f} dense [B, n] "
        "float32 buffers"
    )
    if not a.no_check:
        mib, s = peak(largest, d, batch)
        result["check"] = {"n_latents": largest, "peak_rss_mib": mib, "seconds": s}
        print(f"check: n = {largest:,} trained 3 steps, peak RSS {mib:,.0f} MiB ({s:.0f} s)")
    (HERE / "train_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Training memory: the largest TopK dictionary on this machine",
        "",
        f"`python benchmarks/train_memory.py`: TopK, k 32, d_in {d}, batch {batch}, float32, 3 steps per "
        "run, peak RSS (VmHWM) of a fresh process.",
        "",
        "| latents | peak RSS |",
        "|---:|---:|",
        *[f"| {r['n_latents']:,} | {r['peak_rss_mib']:,.0f} MiB |" for r in rows],
        "",
        f"Fit: **{per_latent:,.0f} bytes per latent** + {intercept:,.0f} MiB. Of that, 32·d_in = "
        f"{32 * d:,} bytes are the float32 parameters, their gradients and Adam's two moments; the rest, "
        f"{per_latent - 32 * d:,.0f} bytes, is about {result['dense_buffers_per_latent']:.1f} dense "
        "[batch, n] float32 buffers (pre-activations, the top-k and its backward).",
        "",
        f"Largest dictionary for {a.budget_gib:g} GiB (10% kept free): **{largest:,} latents** "
        f"({largest / d:.0f}x d_in).",
    ]
    if "check" in result:
        c = result["check"]
        lines.append(f"Checked: {c['n_latents']:,} latents trained, peak RSS {c['peak_rss_mib']:,.0f} MiB.")
    lines += [
        "",
        "On a GPU with M bytes: n ≈ (M − constant) / (32·d_in + c·4·batch) with c as fitted here; "
        "bfloat16 parameters halve the 32·d_in term (Adam's moments stay float32 unless the optimiser "
        "says otherwise), and a smaller batch or latent sharding (`--latent-shards S` divides n by S "
        "per device) shrinks the rest.",
    ]
    (HERE / "train_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
