"""Matryoshka BatchTopK: nested prefixes of the dictionary each reconstruct the input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from saelab import SAE, SAEConfig, create, train_sae
from saelab.activations.source import MatrixSource
from saelab.data.toy import ToyDataConfig, make_toy_data
from saelab.eval.metrics import evaluate_reconstruction
from saelab.sae.base import TrainContext, squared_error
from saelab.sae.matryoshka import MatryoshkaConfig

D, N, K = 16, 60, 4


def make(**extra) -> SAE:
    torch.manual_seed(0)
    sae = create(SAEConfig(architecture="matryoshka", d_in=D, n_latents=N, k=K, **extra))
    with torch.no_grad():
        sae.b_enc.add_(0.05 * torch.randn_like(sae.b_enc))
        sae.b_dec.add_(0.05 * torch.randn_like(sae.b_dec))
    return sae


def test_default_groups_double_and_fill_the_dictionary() -> None:
    assert MatryoshkaConfig().sizes(512) == [17, 33, 66, 132, 264]
    assert MatryoshkaConfig(groups=3).sizes(7) == [1, 2, 4]
    assert MatryoshkaConfig(group_sizes=[10, 50]).sizes(60) == [10, 50]
    assert make(group_sizes=[10, 20, 30]).group_ends == [10, 30, 60]


def test_group_sizes_must_fill_the_dictionary() -> None:
    with pytest.raises(ValueError, match=r"sum to 50, not n_latents = 60"):
        SAEConfig(architecture="matryoshka", d_in=D, n_latents=N, k=K, group_sizes=[10, 40])
    with pytest.raises(ValueError, match="k = 60 must be smaller"):
        SAEConfig(architecture="matryoshka", d_in=D, n_latents=N, k=N)


def test_loss_sums_every_prefix_reconstruction_and_l0_is_k_on_average() -> None:
    sae = make(group_sizes=[10, 20, 30])
    x = torch.randn(64, D)
    out = sae.training_forward(x, TrainContext())
    assert float(out.l0) == pytest.approx(K, abs=1e-6)  # BatchTopK: exactly k·B kept
    # the same latents, decoded by hand through each prefix
    pre = sae.pre_activations(x).relu().detach()
    values, idx = pre.flatten().topk(K * 64)
    z = torch.zeros_like(pre.flatten()).scatter_(0, idx, values).view_as(pre)
    with torch.no_grad():
        prefixes = [squared_error(x, z[:, :e] @ sae.W_dec[:e] + sae.b_dec) for e in (10, 30, 60)]
    assert float(out.terms["mse"]) == pytest.approx(float(prefixes[-1]), rel=1e-5)
    assert float(out.terms["prefix_mse"]) == pytest.approx(float(prefixes[0] + prefixes[1]), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(float(sum(prefixes)) + float(out.terms["auxk"]) / 32,
                                                     rel=1e-5)


def test_gradients_reach_every_parameter_and_the_first_group_learns_from_every_prefix() -> None:
    sae = make(group_sizes=[10, 50])
    x = torch.randn(128, D) * 2
    out = sae.training_forward(x, TrainContext(dead_mask=torch.rand(N) < 0.5))
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_save_load_round_trip_in_the_saelens_layout(tmp_path) -> None:
    sae = make(group_sizes=[10, 50])
    sae.threshold.fill_(0.03)
    sae.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == N  # SAELens reads a JumpReLU
    assert cfg["saelab"]["sae"] == {"architecture": "matryoshka", "k": K, "aux_k_coefficient": 1 / 32,
                                    "k_aux": None, "threshold_ema": 0.01, "group_sizes": [10, 50],
                                    "groups": 5}
    tensors = load_file(tmp_path / "m" / "sae_weights.safetensors")
    assert torch.allclose(tensors["threshold"], torch.full((N,), 0.03))
    loaded = SAE.load(tmp_path / "m")
    assert type(loaded) is type(sae) and loaded.group_ends == [10, 60]
    x = torch.randn(20, D)
    assert torch.allclose(loaded(x), sae(x), atol=1e-6)


def test_trains_on_toy_data_and_its_first_group_alone_reconstructs(tmp_path) -> None:
    data = make_toy_data(ToyDataConfig(d_in=32, n_features=64, avg_active=3, seed=3))
    x, _ = data.sample(30_000, seed=1)
    held, _ = data.sample(4_000, seed=2)
    sae = train_sae(x, architecture="matryoshka", n_latents=128, k=3, group_sizes=[16, 112],
                    tokens=120_000, batch_size=512, lr=3e-3, progress=False)
    full = evaluate_reconstruction(sae, MatrixSource(held).rows(4000))
    assert full.fvu < 0.3 and full.l0 < 6
    with torch.no_grad():  # the 16 latents of the first group, alone
        z = sae.encode(held)
        z[:, 16:] = 0
        first = float(((sae.decode(z) - held) ** 2).sum() / ((held - held.mean(0)) ** 2).sum())
    assert first < 0.85, first


def test_cli_trains_it_with_group_sizes(tmp_path) -> None:
    import numpy as np

    x = torch.randn(4096, 8)
    np.save(tmp_path / "x.npy", x.numpy())
    proc = run_cli("train", "--acts", str(tmp_path / "x.npy"), "--arch", "matryoshka", "--n-latents", "24",
                   "--k", "2", "--group-sizes", "8,16", "--tokens", "4096", "--batch-size", "512",
                   "--out", str(tmp_path / "m"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert SAE.load(tmp_path / "m").cfg.sae.group_sizes == [8, 16]
