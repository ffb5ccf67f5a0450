"""Each architecture: shapes, sparsity, gradients, and the SAELens on-disk layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from saelab import SAE, InputError, SAEConfig, create
from saelab.sae.base import TrainContext
from saelab.sae.kernels import sparse_decode, topk_encode

ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated"]
D, N, K = 24, 96, 4


def make(arch: str, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    extra = {"k": K} if "topk" in arch else {"bandwidth": 2.0} if arch == "jumprelu" else {}
    cfg = SAEConfig(architecture=arch, d_in=D, n_latents=N, **extra)
    sae = create(cfg)
    with torch.no_grad():  # non-trivial biases so every path is exercised
        for _name, p in sae.named_parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    return sae


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes(arch: str) -> None:
    sae = make(arch)
    x = torch.randn(3, 5, D)
    z = sae.encode(x)
    assert z.shape == (3, 5, N)
    assert sae.decode(z).shape == (3, 5, D)
    assert sae(x).shape == (3, 5, D)
    assert torch.allclose(sae(x), sae.decode(sae.encode(x)), atol=1e-5)
    assert sae.W_enc.shape == (D, N) and sae.W_dec.shape == (N, D)
    assert (z >= 0).all()


def test_topk_l0_is_exactly_k() -> None:
    sae = make("topk")
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # all pre-activations positive: exactly k survive
    z = sae.encode(torch.randn(200, D))
    assert ((z != 0).sum(-1) == K).all()


def test_topk_forward_is_sparse_decode_of_top_k() -> None:
    sae = make("topk")
    x = torch.randn(50, D)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(K, dim=-1)
    dense = torch.zeros_like(pre).scatter_(1, idx, vals.relu())
    assert torch.allclose(sae.encode(x), dense, atol=1e-5)
    assert torch.allclose(sae(x), dense @ sae.W_dec + sae.b_dec, atol=1e-5)


def test_sparse_kernels_match_dense_autograd() -> None:
    torch.manual_seed(1)
    B, n, d, k, k_aux = 16, 40, 8, 3, 5
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, requires_grad=True)
    Wd = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    dead = torch.rand(n) < 0.5
    g_out, g_aux = torch.randn(B, d, dtype=torch.float64), torch.randn(B, d, dtype=torch.float64)

    codes = topk_encode(x, W, b, k, dead, k_aux)
    assert codes.aux_indices is not None and dead[codes.aux_indices].all()
    out = sparse_decode(codes.values, codes.indices, Wd)
    aux = sparse_decode(codes.aux_values, codes.aux_indices, Wd)
    ((out * g_out).sum() + (aux * g_aux).sum()).backward()
    sparse_grads = [t.grad.clone() for t in (x, W, b, Wd)]

    for t in (x, W, b, Wd):
        t.grad = None
    pre = x @ W.T + b
    keep = torch.zeros_like(pre).scatter(1, codes.indices, 1.0)
    keep_aux = torch.zeros_like(pre).scatter(1, codes.aux_indices, 1.0)
    z, z_aux = pre.relu() * keep, pre.relu() * keep_aux
    ((z @ Wd * g_out).sum() + (z_aux @ Wd * g_aux).sum()).backward()
    for got, want in zip(sparse_grads, (x.grad, W.grad, b.grad, Wd.grad), strict=True):
        assert torch.allclose(got, want, atol=1e-10)


def test_sparse_kernels_in_bfloat16_follow_float64() -> None:
    """bfloat16 takes another sparse path on the CPU (no CSR kernel); its gradients must be
    the dense float64 ones for the same selected latents, to bfloat16 precision."""
    torch.manual_seed(2)
    B, n, d, k = 64, 256, 32, 8
    x, W, b, Wd = (torch.randn(*s).bfloat16().requires_grad_(True) for s in ((B, d), (n, d), (n,), (n, d)))
    g = torch.randn(B, d).bfloat16()
    codes = topk_encode(x, W, b, k)
    (sparse_decode(codes.values, codes.indices, Wd) * g).sum().backward()
    x64, W64, b64, Wd64 = (t.detach().double().requires_grad_(True) for t in (x, W, b, Wd))
    keep = torch.zeros(B, n, dtype=torch.float64).scatter(1, codes.indices, 1.0)
    ((((x64 @ W64.T + b64).relu() * keep) @ Wd64) * g.double()).sum().backward()
    for low, want in zip((x, W, b, Wd), (x64, W64, b64, Wd64), strict=True):
        assert (low.grad.double() - want.grad).norm() <= 0.02 * want.grad.norm()


def test_chunked_gather_dot_and_workspace_leave_the_kernels_exact(monkeypatch) -> None:
    """The decoder's value gradient is gathered a block of rows at a time, and a workspace
    keeps the dense pre-activations between calls: neither may change a number."""
    import saelab.sae.kernels as kernels

    monkeypatch.setattr(kernels, "GATHER_CHUNK_ELEMENTS", 3 * 4 * 8)  # 3 rows per block
    torch.manual_seed(3)
    B, n, d, k = 10, 30, 8, 4
    ins = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((B, d), (n, d), (n,), (n, d))]
    g = torch.randn(B, d, dtype=torch.float64)

    def grads(workspace):
        for t in ins:
            t.grad = None
        x, W, b, Wd = ins
        codes = topk_encode(x, W, b, k, workspace=workspace)
        (sparse_decode(codes.values, codes.indices, Wd) * g).sum().backward()
        return codes, [t.grad.clone() for t in ins]

    plain, plain_grads = grads(None)
    workspace: dict = {}
    for _ in range(2):  # the second call reuses the first's buffer
        codes, got = grads(workspace)
        assert torch.equal(codes.indices, plain.indices) and torch.equal(codes.values, plain.values)
        for a, want in zip(got, plain_grads, strict=True):
            assert torch.allclose(a, want, atol=1e-12)
    assert workspace["pre"].shape == (B, n)
    ptr = workspace["pre"].data_ptr()
    grads(workspace)
    assert workspace["pre"].data_ptr() == ptr
    # the value gradient against a [B, k, d] gather
    Wd = ins[3]
    idx = plain.indices
    want = (Wd.detach()[idx] * g[:, None, :]).sum(-1)
    assert torch.allclose(kernels._gather_dot(Wd.detach(), idx, g), want, atol=1e-12)


def test_autocast_runs_only_the_encoder_matmul_in_bfloat16() -> None:
    """Mixed precision: under torch.autocast the TopK encoder's matmul runs in bfloat16, but
    the values, the reconstruction and every gradient come back in float32, and the
    selection matches float32 up to near-ties."""
    torch.manual_seed(4)
    B, n, d, k = 64, 512, 32, 8
    x, W, b, Wd = (torch.randn(*s).requires_grad_(True) for s in ((B, d), (n, d), (n,), (n, d)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = topk_encode(x, W, b, k)
        out = sparse_decode(codes.values, codes.indices, Wd)
    assert codes.values.dtype == out.dtype == torch.float32
    out.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (x, W, b, Wd))
    with torch.no_grad():
        full = topk_encode(x, W, b, k)
        overlap = torch.tensor([len(set(a.tolist()) & set(c.tolist()))
                                for a, c in zip(codes.indices, full.indices, strict=True)])
        assert overlap.float().mean() >= 0.95 * k
        exact = (x @ W.T + b).gather(1, codes.indices).relu()
        assert torch.allclose(codes.values, exact, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_learned_parameter(arch: str) -> None:
    sae = make(arch)
    x = torch.randn(256, D) * 2
    ctx = TrainContext(sparsity_coefficient=0.1, dead_mask=torch.rand(N) < 0.5)
    out = sae.training_forward(x, ctx)
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None, f"{arch}: {name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{arch}: {name} got a zero gradient"
    assert out.fired.shape == (N,) and out.fired.dtype == torch.bool
    if arch == "topk":
        assert float(out.l0) <= K and float(out.terms["auxk"]) > 0


def test_batchtopk_keeps_k_per_row_on_average_and_learns_threshold() -> None:
    sae = make("batchtopk")
    x = torch.randn(128, D)
    out = sae.training_forward(x, TrainContext())
    assert float(out.l0) == pytest.approx(K, abs=1e-6)
    assert float(sae.threshold) > 0  # EMA of the smallest kept activation


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_in_saelens_layout(arch: str, tmp_path) -> None:
    sae = make(arch)
    if arch == "batchtopk":
        sae.threshold.fill_(0.02)
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == D and cfg["d_sae"] == N
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch)
    assert cfg["saelab"]["sae"]["architecture"] == arch and cfg["saelab"]["format_version"] == 2
    tensors = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert tensors["W_enc"].shape == (D, N) and tensors["W_dec"].shape == (N, D)
    assert tensors["b_dec"].shape == (D,)
    if arch == "gated":
        assert {"b_gate", "b_mag", "r_mag"} <= set(tensors)
    else:
        assert tensors["b_enc"].shape == (N,)
    if arch in ("jumprelu", "batchtopk"):
        assert tensors["threshold"].shape == (N,)
    loaded = SAE.load(tmp_path / "sae")
    assert type(loaded) is type(sae)
    x = torch.randn(20, D)
    assert torch.allclose(loaded(x), sae(x), atol=1e-6)
    assert not list((tmp_path / "sae").glob("*.tmp")), "temporary files left behind"


def test_loads_a_plain_saelens_folder(tmp_path) -> None:
    """A folder written by SAELens (no saelab section) loads with the right architecture."""
    sae = make("topk")
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del cfg["saelab"]
    cfg["k"] = K
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    loaded = SAE.load(tmp_path / "s")
    assert loaded.cfg.architecture == "topk" and loaded.cfg.k == K
    x = torch.randn(10, D)
    assert torch.allclose(loaded(x), sae(x), atol=1e-6)


def test_saelens_metadata_is_written_where_saelens_6_reads_it(tmp_path) -> None:
    sae = make("topk")
    sae.cfg = sae.cfg.model_copy(update={"hook_name": "blocks.3.hook_resid_post", "model_name": "m"})
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["k"] == K  # top level, where SAELens reads it (its default is 100)
    for key in ("metadata", "meta"):  # SAELens 6; SAELens 5 and saelab 0.4
        assert cfg[key]["hook_name"] == "blocks.3.hook_resid_post" and cfg[key]["model_name"] == "m"
    del cfg["saelab"], cfg["meta"]
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    assert SAE.load(tmp_path / "s").cfg.hook_name == "blocks.3.hook_resid_post"


@pytest.mark.parametrize(("setting", "value"), [
    ("normalize_activations", "layer_norm"), ("normalize_activations", "expected_average_only_in"),
    ("rescale_acts_by_decoder_norm", True), ("apply_b_dec_to_input", False),
    ("reshape_activations", "hook_z"), ("hook_head_index", 3)])
def test_saelens_settings_saelab_does_not_compute_are_refused(tmp_path, setting, value) -> None:
    """A SAELens folder that SAELens would run differently is refused, naming the setting,
    never loaded to compute something else."""
    make("topk").save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del cfg["saelab"]
    if setting == "hook_head_index":
        cfg["metadata"][setting] = value
    else:
        cfg[setting] = value
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=rf"SAELens setting {setting} = {value!r} is not implemented"):
        SAE.load(tmp_path / "s")


def test_fold_input_scale_keeps_latents_and_rescales_output() -> None:
    sae = make("jumprelu")
    x = torch.randn(30, D)
    c = 3.7
    z_scaled, recon_scaled = sae.encode(c * x), sae(c * x)
    sae.fold_input_scale(c)
    assert torch.allclose(sae.encode(x), z_scaled, atol=1e-5)
    assert torch.allclose(sae(x), recon_scaled / c, atol=1e-5)


def test_width_mismatch_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="does not match the SAE's d_in = 24"):
        make("topk")(torch.randn(4, D + 1))


def test_k_must_be_below_n_latents() -> None:
    with pytest.raises(ValueError, match="k = 96 must be smaller than n_latents = 96"):
        SAEConfig(architecture="topk", d_in=D, n_latents=N, k=N)


def test_load_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(InputError, match=r"no cfg\.json"):
        SAE.load(tmp_path)
    make("relu").save(tmp_path / "s")
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot read"):
        SAE.load(tmp_path / "s")
