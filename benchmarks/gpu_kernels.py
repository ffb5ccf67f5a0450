"""The sparse decode and its backward on a GPU: Triton kernels against the PyTorch fallback,
and whole TopK training steps (float32, and bfloat16 matmuls with float32 weights).

    python benchmarks/gpu_kernels.py [--device cuda] [--n-latents 24576,131072] [--out DIR]

For each dictionary size (d_in 768, k 32, batch 4096): milliseconds per sparse decode
forward + backward with ``SAELAB_TRITON=1`` and ``=0``, and training tokens/s of saelab's
Trainer. Writes DIR/gpu_kernels.{json,md} (default benchmarks/). On a machine without CUDA,
``--device cpu`` times the fallback path only (a check that the script runs).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from saelab.activations.source import MatrixSource
from saelab.sae import triton_kernels
from saelab.sae.kernels import sparse_decode
from saelab.train.config import TrainConfig
from saelab.train.trainer import Trainer

D, K, BATCH = 768, 32, 4096


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_ms(device: torch.device, n: int, triton: bool, reps: int = 20) -> float:
    os.environ["SAELAB_TRITON"] = "1" if triton else "0"
    g = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(n, D, device=device, generator=g, requires_grad=True)
    v = torch.rand(BATCH, K, device=device, generator=g, requires_grad=True)
    idx = torch.randint(n, (BATCH, K), device=device, generator=g)
    grad = torch.randn(BATCH, D, device=device, generator=g)

    def once() -> None:
        W.grad = v.grad = None
        sparse_decode(v, idx, W).backward(grad)

    once()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    sync(device)
    return (time.perf_counter() - t0) / reps * 1000


def train_tokens_per_s(device: torch.device, n: int, matmul_dtype: str | None, steps: int = 20) -> float:
    os.environ["SAELAB_TRITON"] = "1"
    x = torch.randn(BATCH * 4, D)
    cfg = TrainConfig(architecture="topk", n_latents=n, k=K, tokens=(steps + 3) * BATCH,
                      batch_size=BATCH, device=str(device), matmul_dtype=matmul_dtype, progress=False,
                      checkpoint_every_steps=0, log_every_steps=10**9)
    t = Trainer(MatrixSource(x), cfg)
    t.begin()
    batches = [x[i * BATCH:(i + 1) * BATCH].to(device) for i in range(4)]
    for i in range(3):
        t.train_step(batches[i % 4])
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        t.train_step(batches[i % 4])
    sync(device)
    return steps * BATCH / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n-latents", default="24576,131072")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine (or --device cpu to check the script)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with_triton = triton_kernels.AVAILABLE and device.type == "cuda"
    rows = []
    for n in (int(s) for s in a.n_latents.split(",")):
        row: dict = {"n_latents": n, "fallback_ms": decode_ms(device, n, triton=False)}
        if with_triton:
            row["triton_ms"] = decode_ms(device, n, triton=True)
        row["train_fp32_tok_s"] = train_tokens_per_s(device, n, None)
        row["train_bf16_matmul_tok_s"] = train_tokens_per_s(device, n, "bfloat16")
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": name, "torch": torch.__version__, "triton": with_triton, "d_in": D, "k": K,
              "batch": BATCH, "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Sparse decode and TopK training on {name}", "",
             f"`python benchmarks/gpu_kernels.py`: d_in {D}, k {K}, batch {BATCH}, "
             f"torch {torch.__version__}.",
             "Decode: forward + backward of the sparse decode (ms). Training: saelab Trainer steps.", "",
             "| latents | decode, PyTorch fallback | decode, Triton | train float32 tok/s | "
             "train bf16 matmul tok/s |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        tri = f"{r['triton_ms']:.2f} ms" if "triton_ms" in r else "–"
        lines.append(f"| {r['n_latents']:,} | {r['fallback_ms']:.2f} ms | {tri} | "
                     f"{r['train_fp32_tok_s']:,.0f} | {r['train_bf16_matmul_tok_s']:,.0f} |")
    (a.out / "gpu_kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
