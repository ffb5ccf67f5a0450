"""Triton kernels for k-sparse latents on a GPU: the sparse decode and its backward.

Three row operations cover the TopK SAE's sparse work, forward and backward, for any rows
``W`` (the decoder, or the encoder kept as latent rows), indices ``idx`` [B, k] and weights:

* :func:`gather_sum` — ``out[b] = Σ_j v[b, j] · W[idx[b, j]]``: the decode, and the
  encoder's input gradient.
* :func:`gather_dot` — ``out[b, j] = <W[idx[b, j]], g[b]>``: the gradient of the values.
* :func:`scatter_add` — ``out[i] += Σ_{(b, j): idx[b, j] = i} v[b, j] · g[b]``: the decoder's
  and the encoder's weight gradients, touching only the selected rows (float32 atomics).

Each program handles one row ``b`` and a block of the model dimension (or of the k
latents), accumulating in float32 whatever the storage dtype. :mod:`saelab.sae.kernels`
uses them for CUDA tensors when Triton is importable (``SAELAB_TRITON=0`` turns them off)
and falls back to ``embedding_bag`` and sparse matrix products otherwise.

With ``TRITON_INTERPRET=1`` set before this module is imported, Triton runs the same
kernels on CPU tensors through its interpreter; the tests check them that way on machines
without a GPU.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

AVAILABLE = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


_failed: str | None = None  # why the kernels stopped being used in this process, if they did


def usable(t: Tensor) -> bool:
    """Whether the Triton path applies to tensors like ``t``: Triton importable, not turned off
    by ``SAELAB_TRITON=0``, not failed earlier in this process, and ``t`` on a CUDA device
    (or on the CPU under the interpreter)."""
    if not AVAILABLE or _failed is not None or os.environ.get("SAELAB_TRITON", "1") == "0":
        return False
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def run(fn: Callable[..., Tensor], *args: Any) -> Tensor | None:
    """``fn(*args)``, or None (with a warning, once) if Triton fails to compile or launch it on
    this machine: the caller then takes the PyTorch path, and so does every later call."""
    global _failed
    try:
        return fn(*args)
    except Exception as e:  # compiler and driver errors have no common type
        _failed = f"{type(e).__name__}: {e}"
        warnings.warn(f"saelab's Triton kernels failed ({_failed[:300]}); using the PyTorch path "
                      "(SAELAB_TRITON=0 skips them)", RuntimeWarning, stacklevel=2)
        return None


def _blocks(k: int, d: int) -> tuple[int, int]:
    block_k = min(32, triton.next_power_of_2(max(k, 1)))
    block_d = min(128, triton.next_power_of_2(max(d, 1)))
    return block_k, block_d


if AVAILABLE:

    @triton.jit
    def _gather_sum_kernel(idx_ptr, val_ptr, w_ptr, out_ptr, K, D,
                           BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j0 in range(0, K, BLOCK_K):
            offs_k = j0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            rows = tl.load(idx_ptr + b * K + offs_k, mask=kmask, other=0).to(tl.int64)
            vals = tl.load(val_ptr + b * K + offs_k, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * D + offs_d[None, :],
                        mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * vals[:, None], axis=0)
        tl.store(out_ptr + b * D + offs_d, acc, mask=dmask)

    @triton.jit
    def _gather_dot_kernel(idx_ptr, w_ptr, g_ptr, out_ptr, K, D,
                           BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        rows = tl.load(idx_ptr + b * K + offs_k, mask=kmask, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            g = tl.load(g_ptr + b * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * D + offs_d[None, :],
                        mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * g[None, :], axis=1)
        tl.store(out_ptr + b * K + offs_k, acc, mask=kmask)

    @triton.jit
    def _scatter_add_kernel(idx_ptr, val_ptr, g_ptr, out_ptr, K, D,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        g = tl.load(g_ptr + b * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
        for j0 in range(0, K, BLOCK_K):
            offs_k = j0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            rows = tl.load(idx_ptr + b * K + offs_k, mask=kmask, other=0).to(tl.int64)
            vals = tl.load(val_ptr + b * K + offs_k, mask=kmask, other=0.0).to(tl.float32)
            tl.atomic_add(out_ptr + rows[:, None] * D + offs_d[None, :], vals[:, None] * g[None, :],
                          mask=kmask[:, None] & dmask[None, :])


def gather_sum(indices: Tensor, values: Tensor, W: Tensor) -> Tensor:
    """``out[b] = Σ_j values[b, j] · W[indices[b, j]]`` as [B, d] in ``W``'s dtype."""
    B, k = indices.shape
    d = W.shape[1]
    out = torch.empty(B, d, dtype=torch.float32, device=W.device)
    block_k, block_d = _blocks(k, d)
    _gather_sum_kernel[(B, triton.cdiv(d, block_d))](
        indices.contiguous(), values.contiguous(), W.contiguous(), out, k, d,
        BLOCK_K=block_k, BLOCK_D=block_d)
    return out.to(W.dtype)


def gather_dot(W: Tensor, indices: Tensor, g: Tensor) -> Tensor:
    """``out[b, j] = <W[indices[b, j]], g[b]>`` as [B, k] in ``g``'s dtype."""
    B, k = indices.shape
    d = W.shape[1]
    out = torch.empty(B, k, dtype=torch.float32, device=W.device)
    block_k, block_d = _blocks(k, d)
    _gather_dot_kernel[(B, triton.cdiv(k, block_k))](
        indices.contiguous(), W.contiguous(), g.contiguous(), out, k, d,
        BLOCK_K=block_k, BLOCK_D=block_d)
    return out.to(g.dtype)


def scatter_add(n_rows: int, indices: Tensor, values: Tensor, g: Tensor) -> Tensor:
    """``out[i] = Σ_{(b, j): indices[b, j] = i} values[b, j] · g[b]`` as [n_rows, d] in ``g``'s
    dtype (accumulated in float32)."""
    B, k = indices.shape
    d = g.shape[1]
    out = torch.zeros(n_rows, d, dtype=torch.float32, device=g.device)
    block_k, block_d = _blocks(k, d)
    _scatter_add_kernel[(B, triton.cdiv(d, block_d))](
        indices.contiguous(), values.contiguous(), g.contiguous(), out, k, d,
        BLOCK_K=block_k, BLOCK_D=block_d)
    return out.to(g.dtype)
