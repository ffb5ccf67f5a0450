"""The Triton kernels for the sparse decode and its backward, run by Triton's interpreter on
the CPU (``TRITON_INTERPRET=1``): the same kernel code a GPU compiles, checked against the
PyTorch path on shapes that exercise every mask (k and d not multiples of the blocks,
repeated latents in the scatter)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from saelab.sae import kernels
from saelab.sae import triton_kernels as tk

SCRIPT = textwrap.dedent(
    """
    import os
    import torch
    from saelab.sae import kernels, triton_kernels as tk

    assert tk.AVAILABLE and tk.INTERPRET
    torch.manual_seed(0)
    B, n, d, k, k_aux = 6, 60, 300, 37, 3   # k > one 32-latent block, d > two 128-wide blocks
    x = torch.randn(B, d, requires_grad=True)
    W = torch.randn(n, d, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    Wd = torch.randn(n, d, requires_grad=True)
    dead = torch.rand(n) < 0.5
    g_out, g_aux = torch.randn(B, d), torch.randn(B, d)

    def run(flag):
        os.environ["SAELAB_TRITON"] = flag
        assert tk.usable(x) == (flag == "1")
        for t in (x, W, b, Wd):
            t.grad = None
        codes = kernels.topk_encode(x, W, b, k, dead, k_aux)
        out = kernels.sparse_decode(codes.values, codes.indices, Wd)
        aux = kernels.sparse_decode(codes.aux_values, codes.aux_indices, Wd)
        ((out * g_out).sum() + (aux * g_aux).sum()).backward()
        return [out.detach(), codes.indices] + [t.grad.clone() for t in (x, W, b, Wd)]

    fallback, triton = run("0"), run("1")
    assert tk._failed is None, tk._failed  # the kernels ran; nothing fell back
    assert torch.equal(fallback[1], triton[1])
    for name, a, c in zip(["decode", "indices", "x", "W_enc", "b_enc", "W_dec"], fallback, triton):
        assert torch.allclose(a.float(), c.float(), atol=1e-4, rtol=1e-4), name

    # every latent picked by every row: the scatter's atomics must add up repeats
    idx = torch.arange(4).repeat(B, 1)
    v = torch.rand(B, 4)
    got = tk.scatter_add(n, idx, v, g_out)
    outer = (v[:, :, None] * g_out[:, None, :]).reshape(-1, d)
    want = torch.zeros(n, d).index_add_(0, idx.reshape(-1), outer)
    assert torch.allclose(got, want, atol=1e-4)
    # low-precision rows accumulate in float32 and come back in their own dtype
    Wb = Wd.detach().bfloat16()
    s = tk.gather_sum(idx, v.bfloat16(), Wb)
    assert s.dtype == torch.bfloat16
    ref = (v[:, :, None] * Wb.float()[idx]).sum(1)
    assert torch.allclose(s.float(), ref, rtol=0.02, atol=0.05)
    print("triton kernels match")
    """
)


def test_triton_kernels_match_the_pytorch_path_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "triton kernels match" in proc.stdout


def test_a_failing_triton_kernel_falls_back_to_pytorch(monkeypatch) -> None:
    """If Triton cannot compile or launch a kernel on some machine, the step still runs: the
    PyTorch path takes over (with one warning) for that call and every later one."""
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(tk, "_failed", None)
    monkeypatch.setattr(tk, "usable", lambda t: tk._failed is None)
    monkeypatch.setattr(tk, "gather_sum", broken)
    W, v, idx = torch.randn(20, 6), torch.rand(3, 4), torch.randint(20, (3, 4))
    want = (v[:, :, None] * W[idx]).sum(1)
    with pytest.warns(RuntimeWarning, match="Triton kernels failed"):
        got = kernels.sparse_decode(v, idx, W)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(kernels.sparse_decode(v, idx, W), want, atol=1e-6)
    assert len(calls) == 1 and "no kernel for this GPU" in tk._failed
