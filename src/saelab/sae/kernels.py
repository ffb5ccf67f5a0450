"""Sparse kernels for k-sparse latents.

With TopK, each row has only ``k`` non-zero latents, so everything after the encoder's
dense matmul can touch only those ``k`` latents:

* :func:`topk_encode` — dense pre-activations, top-k selection, and a backward pass that
  sends gradient only to the ``k`` (+ ``k_aux``) selected encoder rows: ``B·k·d`` work
  instead of ``B·n·d``.
* :func:`sparse_decode` — ``x̂ = Σ_j v_j W_dec[i_j]`` via ``embedding_bag`` and a backward
  that gathers/scatters only the selected decoder rows.

On CUDA with Triton importable, the row gathers and scatters run as the Triton kernels of
:mod:`saelab.sae.triton_kernels`; elsewhere as ``embedding_bag``, blocked gathers with
``bmm`` and sparse matrix products.

The encoder weight is passed as ``[n_latents, d_in]`` rows (``W_enc.T``), which the SAE
keeps contiguous so row gathers and ``index_add_`` are cache-friendly.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.sae import triton_kernels


class TopKCodes(NamedTuple):
    values: Tensor  # [B, k] non-negative activations of the selected latents
    indices: Tensor  # [B, k] their latent ids
    aux_values: Tensor | None  # [B, k_aux] AuxK activations among dead latents
    aux_indices: Tensor | None


def _row_gather_add(
    n_rows: int, indices: Tensor, weights: Tensor, other: Tensor
) -> Tensor:
    """``out[i] = Σ_{(b,j): indices[b,j]=i} weights[b,j] · other[b]`` as a dense [n_rows, d].

    Done as a sparse [n_rows, B] × dense [B, d] product, so no [B·k, d] temporary is built:
    CSR (entries sorted by row once; about twice as fast as COO) for float32/float64 on the
    CPU, COO elsewhere (CSR has no bfloat16 kernel on the CPU).
    """
    if triton_kernels.usable(other):
        out = triton_kernels.run(triton_kernels.scatter_add, n_rows, indices, weights, other)
        if out is not None:
            return out
    B, kk = indices.shape
    flat = indices.reshape(-1)
    values = weights.reshape(-1).to(other.dtype)
    if other.device.type != "cpu" or other.dtype not in (torch.float32, torch.float64):
        cols = torch.arange(B, device=indices.device).repeat_interleave(kk)
        coo = torch.sparse_coo_tensor(torch.stack([flat, cols]), values, (n_rows, B), check_invariants=False)
        return torch.sparse.mm(coo, other)
    order = torch.argsort(flat)
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=indices.device)
    crow[1:] = torch.bincount(flat, minlength=n_rows).cumsum(0)
    cols = torch.div(order, kk, rounding_mode="floor")
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(crow, cols, values[order], (n_rows, B), check_invariants=False)
    return csr @ other


GATHER_CHUNK_ELEMENTS = 1 << 20
"""Elements of gathered rows per chunk in :func:`_gather_dot` (4 MiB of float32): large
enough for an efficient ``bmm``, small enough to stay in cache."""


def _gather_dot(W: Tensor, indices: Tensor, g: Tensor) -> Tensor:
    """``out[b, j] = <W[indices[b, j]], g[b]>``: the selected rows gathered a block of rows
    at a time (about :data:`GATHER_CHUNK_ELEMENTS` elements), each block one ``bmm``, so no
    [B, k, d] temporary is built and the gathered block is still in cache when it is used."""
    if triton_kernels.usable(g):
        out = triton_kernels.run(triton_kernels.gather_dot, W, indices, g)
        if out is not None:
            return out
    B, kk = indices.shape
    d = W.shape[1]
    out = torch.empty(indices.shape, dtype=g.dtype, device=g.device)
    # a GPU (without Triton) wants larger blocks; 64 MiB of float32 still bounds the temporary
    chunk = GATHER_CHUNK_ELEMENTS if W.device.type == "cpu" else 16 * GATHER_CHUNK_ELEMENTS
    step = max(1, chunk // (kk * d))
    for s in range(0, B, step):
        idx = indices[s : s + step]
        rows = W.index_select(0, idx.reshape(-1)).view(idx.shape[0], kk, d)
        # [b, 1, d] @ [b, d, k]: about 2.7x faster on a CPU than [b, k, d] @ [b, d, 1]
        g_block = g[s : s + step].unsqueeze(1)
        out[s : s + step] = torch.bmm(g_block, rows.to(g.dtype).transpose(1, 2)).squeeze(1)
    return out


def _gather_sum(indices: Tensor, weights: Tensor, W: Tensor) -> Tensor:
    """``out[b] = Σ_j weights[b, j] · W[indices[b, j]]``."""
    if triton_kernels.usable(W):
        out = triton_kernels.run(triton_kernels.gather_sum, indices, weights, W)
        if out is not None:
            return out
    return F.embedding_bag(indices, W, per_sample_weights=weights, mode="sum")


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The lower-precision dtype of an active ``torch.autocast`` region on ``t``'s device."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        enc_rows: Tensor,
        b_enc: Tensor,
        k: int,
        dead_mask: Tensor | None,
        k_aux: int,
        workspace: dict[str, Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        low = _autocast_dtype(x)
        if low is not None and low != x.dtype:
            # Mixed precision: only the dense matmul (and the selection on its result) runs in
            # the autocast dtype; the values go on in x's dtype, and the backward, which
            # touches only the selected latents, runs in the parameters' dtype.
            x_, w_, b_ = x.to(low), enc_rows.to(low), b_enc.to(low)
        else:
            x_, w_, b_ = x, enc_rows, b_enc
        pre = _buffer(workspace, "pre", (x.shape[0], enc_rows.shape[0]), x_.dtype, x.device)
        pre = torch.addmm(b_, x_, w_.t(), out=pre)
        values, indices = pre.topk(k, dim=-1, sorted=False)
        values = values.to(x.dtype).relu_()
        if dead_mask is not None and k_aux > 0:
            aux_values, aux_indices = pre.masked_fill_(~dead_mask, float("-inf")).topk(
                k_aux, dim=-1, sorted=False
            )
            aux_values = aux_values.to(x.dtype).relu_()
        else:
            aux_values = x.new_zeros(x.shape[0], 0)
            aux_indices = indices.new_zeros(x.shape[0], 0)
        ctx.save_for_backward(x, enc_rows, values, indices, aux_values, aux_indices)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_values: Tensor, _gi: Tensor, grad_aux: Tensor, _ga: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, enc_rows, values, indices, aux_values, aux_indices = ctx.saved_tensors
        g = grad_values * (values > 0)
        idx = indices
        if aux_indices.shape[1] > 0:
            g = torch.cat([g, grad_aux * (aux_values > 0)], dim=1)
            idx = torch.cat([indices, aux_indices], dim=1)
        g = g.contiguous()
        grad_x = grad_rows = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _gather_sum(idx, g, enc_rows)
        if ctx.needs_input_grad[1]:
            grad_rows = _row_gather_add(enc_rows.shape[0], idx, g, x)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(enc_rows.shape[0], dtype=g.dtype, device=g.device)
            grad_b.index_add_(0, idx.reshape(-1), g.reshape(-1))
        return grad_x, grad_rows, grad_b, None, None, None, None


def _buffer(workspace: dict[str, Tensor] | None, name: str, shape: tuple[int, ...],
            dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """A scratch tensor kept in ``workspace`` between calls of the same shape (None without a
    workspace). A fresh [4096, 24576] float32 tensor costs about 0.1 s of page faults on a
    CPU each step; a kept one costs nothing."""
    if workspace is None:
        return None
    buf = workspace.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
        buf = workspace[name] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def topk_encode(
    x: Tensor,
    enc_rows: Tensor,
    b_enc: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    workspace: dict[str, Tensor] | None = None,
) -> TopKCodes:
    """Top-k of ``ReLU(x @ enc_rows.T + b_enc)`` with a sparse backward.

    With ``dead_mask`` and ``k_aux > 0`` also returns the top ``k_aux`` activations among
    dead latents (for the AuxK loss); their gradient is merged into the same sparse update.
    A ``workspace`` dict (a training loop keeps one) holds the dense [B, n_latents]
    pre-activations between calls instead of allocating them each time. Inside a
    ``torch.autocast`` region the dense matmul runs in the autocast dtype (mixed precision).
    """
    values, indices, aux_values, aux_indices = _TopKEncode.apply(
        x, enc_rows, b_enc, k, dead_mask, k_aux, workspace
    )
    if aux_indices.shape[1] == 0:
        return TopKCodes(values, indices, None, None)
    return TopKCodes(values, indices, aux_values, aux_indices)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(values, indices, W_dec)
        return _gather_sum(indices, values, W_dec)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None]:  # type: ignore[override]
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        grad_out = grad_out.contiguous()
        if ctx.needs_input_grad[0]:
            # <W_dec[i_bj], g_b> for each selected latent
            grad_values = _gather_dot(W_dec, indices, grad_out)
        if ctx.needs_input_grad[2]:
            grad_W = _row_gather_add(W_dec.shape[0], indices, values, grad_out)
        return grad_values, None, grad_W


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """``Σ_j values[b, j] · W_dec[indices[b, j]]`` for each row ``b`` (no bias)."""
    return _SparseDecode.apply(values.to(W_dec.dtype), indices, W_dec)


def dense_from_sparse(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
    """Scatter [B, k] codes into a dense [B, n_latents] matrix."""
    out = values.new_zeros(values.shape[0], n_latents)
    return out.scatter_(1, indices, values)
