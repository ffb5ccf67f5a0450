"""TopK training throughput: saelab's trainer vs a plain dense PyTorch TopK SAE.

    python benchmarks/train_throughput.py [--d-in 512 --n-latents 16384 --k 32 --batch 4096]

Both train on the same random activations with Adam. The dense baseline is what most
code does: scatter the top-k into a dense [B, n] matrix and multiply it by the decoder,
letting autograd differentiate everything densely. saelab is timed through its real
``Trainer`` (sparse TopK backward, sparse decode, AuxK bookkeeping, decoder-norm
constraint). The floor is the encoder matmul, 2·d_in·n_latents FLOPs per token, at this
machine's measured float32 matmul rate. Runs alternate, and medians are reported.
Results are printed and written to benchmarks/train_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from saelab.activations.source import MatrixSource
from saelab.train.config import TrainConfig
from saelab.train.trainer import Trainer

HERE = Path(__file__).parent


def matmul_gflops(b: int, d: int, n: int, repeats: int = 5) -> float:
    a, w = torch.randn(b, d), torch.randn(d, n)
    torch.mm(a, w)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, w)
        times.append(time.perf_counter() - t)
    return 2 * b * d * n / statistics.median(times) / 1e9


class DenseTopK(torch.nn.Module):
    """The textbook TopK SAE: dense latents, dense decode, autograd everywhere."""

    def __init__(self, d: int, n: int, k: int) -> None:
        super().__init__()
        w = torch.randn(n, d)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.t().clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(n))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        vals, idx = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        return z @ self.W_dec + self.b_dec


def time_dense(data: torch.Tensor, d: int, n: int, k: int, batch: int, steps: int) -> float:
    model = DenseTopK(d, n, k)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    src = MatrixSource(data)
    it = src.batches(batch, seed=0)
    for i in range(steps + 1):
        if i == 1:  # the first step warms up allocators
            t = time.perf_counter()
        x = next(it)
        loss = (model(x) - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.W_dec /= model.W_dec.norm(dim=1, keepdim=True)
    return steps * batch / (time.perf_counter() - t)


def time_saelab(data: torch.Tensor, n: int, k: int, batch: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(architecture="topk", n_latents=n, k=k, batch_size=batch,
                          tokens=(steps + 1) * batch, log_every_steps=1, checkpoint_every_steps=0,
                          progress=False, device="cpu", dead_after_tokens=batch * 4)
        Trainer(MatrixSource(data), cfg, tmp).run()
        log = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    # Rate over steps 2..N (the first step warms up), from the trainer's own timestamps.
    first, last = log[0], log[-1]
    return (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--n-latents", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    data = torch.randn(a.batch * 8, a.d_in)
    gflops = matmul_gflops(a.batch, a.d_in, a.n_latents)
    floor = gflops * 1e9 / (2 * a.d_in * a.n_latents)
    dense, ours = [], []
    for r in range(a.repeats):
        dense.append(time_dense(data, a.d_in, a.n_latents, a.k, a.batch, a.steps))
        ours.append(time_saelab(data, a.n_latents, a.k, a.batch, a.steps))
        print(f"repeat {r + 1}: dense {dense[-1]:,.0f} tok/s, saelab {ours[-1]:,.0f} tok/s", flush=True)
    d_med, o_med = statistics.median(dense), statistics.median(ours)
    result = {
        "d_in": a.d_in, "n_latents": a.n_latents, "k": a.k, "batch": a.batch,
        "steps_per_repeat": a.steps, "repeats": a.repeats,
        "matmul_gflops_fp32": round(gflops, 1), "floor_tokens_per_s": round(floor),
        "dense_tokens_per_s": round(d_med), "saelab_tokens_per_s": round(o_med),
        "speedup_vs_dense": round(o_med / d_med, 2),
        "saelab_fraction_of_floor": round(o_med / floor, 3),
        "dense_fraction_of_floor": round(d_med / floor, 3),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    print(json.dumps(result, indent=2))
    if not a.no_write:
        (HERE / "train_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
        (HERE / "train_throughput.md").write_text(
            f"# TopK training throughput\n\n"
            f"d_in {a.d_in} · {a.n_latents:,} latents · k {a.k} · batch {a.batch} · float32 · "
            f"{result['machine']}. Medians of {a.repeats} alternating repeats of {a.steps} steps.\n\n"
            f"| | tokens/s | fraction of floor |\n|---|---:|---:|\n"
            f"| encoder floor (2·d·n FLOPs/token at {gflops:.0f} GFLOP/s) | {floor:,.0f} | 1.00 |\n"
            f"| dense PyTorch TopK SAE | {d_med:,.0f} | {d_med / floor:.2f} |\n"
            f"| saelab `Trainer` (sparse TopK) | {o_med:,.0f} | {o_med / floor:.2f} |\n\n"
            f"saelab is **{o_med / d_med:.1f}x** the dense baseline.\n"
            f"Reproduce: `make benchmark` (or `python benchmarks/train_throughput.py`).\n"
        )


if __name__ == "__main__":
    main()
