"""Which torch device a stage runs on: 'auto' (CUDA when there is one), 'cpu', 'cuda[:N]'."""

from __future__ import annotations

import functools
import time

import torch

from saelab.errors import SaelabError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SaelabError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SaelabError(f"device {name!r} asked for, but this torch sees no CUDA device")
    return dev


def _matmul_seconds(device: torch.device, dtype: torch.dtype, rows: int, d_in: int, cols: int) -> float:
    """The best of two timings of one [rows, d_in] @ [d_in, cols] product in ``dtype``, after one
    to warm the kernel up."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(rows, d_in, device=device, generator=g).to(dtype)
    b = torch.randn(d_in, cols, device=device, generator=g).to(dtype)
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=32)
def pick_matmul_dtype(device: torch.device, d_in: int, n_latents: int,
                      candidate: str = "bfloat16") -> tuple[str, str]:
    """('bfloat16' or 'float32', why): whether ``candidate`` runs the encoder's matmul faster than
    float32 on ``device``. bfloat16 is taken only when it is at least 1.25x faster, since it
    costs a little precision. A small product first (256 rows x 256 x 1024: a fraction of a
    second even where bfloat16 is emulated, about 100x slower on some AVX2 CPUs), then, if
    bfloat16 wins there, 1024 rows of the run's shape (width and latents clamped to [256, 1024]
    and [4096, 8192], so that the timing measures the hardware, not the call's overhead).
    Remembered per shape for the life of the process."""
    where = "this GPU" if device.type == "cuda" else "this CPU"
    for rows, width, cols in ((256, 256, 1024),
                              (1024, min(max(d_in, 256), 1024), min(max(n_latents, 4096), 8192))):
        low = _matmul_seconds(device, getattr(torch, candidate), rows, width, cols)
        full = _matmul_seconds(device, torch.float32, rows, width, cols)
        flops = 2 * rows * width * cols
        rates = (f"{candidate} {flops / low / 1e9:.1f} GFLOP/s, float32 {flops / full / 1e9:.1f} GFLOP/s "
                 f"on {where}")
        if full < 1.25 * low:
            return "float32", f"float32 matmuls ({rates})"
    return candidate, f"{candidate} matmuls ({rates})"
