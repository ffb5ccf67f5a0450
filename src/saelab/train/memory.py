"""Keep freed memory in the process while a CPU training run is on.

Each TopK step allocates and frees the same large tensors (gradients of 2 x n x d, the
sparse products' outputs, a bfloat16 copy of the encoder). glibc serves blocks this large
with ``mmap`` and gives them back to the kernel on ``free``, so every step pays the page
faults of touching fresh memory again: measured at 24,576 x 768 on a 2-core CPU, 7% of a
float32 step and 20% of a bf16-matmul step (1.05 -> 0.98 s and 0.48 -> 0.38 s). PyTorch's
CPU tuning guide answers this with jemalloc or tcmalloc; the
same effect needs no extra library: for the length of the run, glibc is told to serve large
blocks from its heap (``M_MMAP_MAX = 0``) and not to trim it (``M_TRIM_THRESHOLD``), so a
freed block is reused by the next step. On the last run's end the defaults come back and
``malloc_trim`` returns the memory. Peak RSS grows (4-21% at 16,384-65,536 latents in
benchmarks/train_memory.py), so a run whose footprint is more than half the available memory
goes without.

Nothing happens off glibc (macOS, musl) or with ``SAELAB_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_MMAP_MAX = 65536
DEFAULT_TRIM_THRESHOLD = 128 * 1024

_lock = threading.Lock()
_users = 0


def _libc() -> ctypes.CDLL | None:
    if os.environ.get("SAELAB_KEEP_FREED_MEMORY", "1") == "0":
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def retain(footprint_bytes: int = 0) -> bool:
    """Start keeping freed memory, if a run of about ``footprint_bytes`` leaves room for it:
    kept blocks that a later allocation cannot reuse raise the peak (by 4-21% at 16k-65k
    latents), so a run that needs more than half the available memory goes without.
    True if retained (then release() must follow; the calls are counted)."""
    global _users
    with _lock:
        libc = _libc()
        if libc is None:
            return False
        if _users == 0:
            available = available_bytes()
            if available is None or 2 * footprint_bytes > available:
                return False
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # an int: about 2 GiB
        _users += 1
        return True


def release() -> None:
    """Undo one retain(); the last one restores glibc's defaults and returns freed memory."""
    global _users
    with _lock:
        if _users == 0:
            return
        _users -= 1
        libc = _libc()
        if _users == 0 and libc is not None:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)


# Bytes per latent beyond the parameters, per row of the batch: the dense [batch, n] float32
# buffers of a step (pre-activations, the top-k and its backward), 1.15 of them as fitted in
# benchmarks/train_memory.py (18,787 bytes per latent at batch 4096).
DENSE_BYTES_PER_ROW = 4.6


def training_bytes(d_in: int, d_out: int, n_latents: int, batch_size: int, param_bytes: int = 4) -> int:
    """About how much memory one training process needs: the encoder and decoder with their
    gradients (``param_bytes`` each) and Adam's two float32 moments, the dense [batch, n]
    buffers of a step, and a few [batch, d] copies of the rows."""
    per_latent = (d_in + d_out) * (2 * param_bytes + 8) + DENSE_BYTES_PER_ROW * batch_size
    return int(n_latents * per_latent + 4 * 4 * batch_size * (d_in + d_out))


def free_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can have on ``device``: MemAvailable on the CPU, the free
    device memory on CUDA (None where it cannot be told)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        return available_bytes()
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"
