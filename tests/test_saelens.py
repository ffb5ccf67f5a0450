"""Interoperability with the real SAELens (6.54.12, in its own venv ``.venv-saelens``, made by
``make saelens-env``): every SAE folder saelab writes loads in SAELens's own loader with the
same latents, reconstruction and names, and every SAELens folder saelab reads gives SAELens's
outputs. Nothing here re-implements SAELens's reader."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.sae.base import SAE, create
from saelab.sae.config import SAEConfig

ROOT = Path(__file__).parents[1]
SIDE = ROOT / "tests" / "interop" / "saelens_side.py"
PYTHON = Path(os.environ.get("SAELAB_SAELENS_PYTHON", ROOT / ".venv-saelens" / "bin" / "python"))
D, N, K = 16, 64, 4
pytestmark = pytest.mark.slow


def saelens(*args: str) -> list[dict]:
    if not PYTHON.exists():
        pytest.fail(f"{PYTHON} is missing: `make saelens-env` builds SAELens's venv (make test does)")
    p = subprocess.run([str(PYTHON), str(SIDE), *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def _random(arch: str, seed: int) -> SAE:
    extra = {"k": K} if arch in ("topk", "batchtopk", "matryoshka") else {}
    if arch == "matryoshka":
        extra["group_sizes"] = [16, 48]
    sae = create(SAEConfig(architecture=arch, d_in=D, n_latents=N, hook_name="blocks.2.hook_resid_post",
                           model_name="smollm2-135m", **extra))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W") else 0.05))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g) * 0.2)
    return sae


ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"]


def test_every_saelab_architecture_loads_in_saelens_with_the_same_outputs(tmp_path) -> None:
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(1))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    saes = {a: _random(a, i) for i, a in enumerate(ARCHS)}
    for a, sae in saes.items():
        sae.save(tmp_path / a)
    names = saelens("read", str(tmp_path / "x.safetensors"), str(tmp_path / "out.safetensors"),
                    *(str(tmp_path / a) for a in ARCHS))
    out = load_file(str(tmp_path / "out.safetensors"))
    for i, (a, sae) in enumerate(saes.items()):
        with torch.no_grad():
            z = sae.encode(x)
            recon = sae.decode(z)
        assert (out[f"{i}.z"] - z).abs().max() < 1e-4, a
        assert (out[f"{i}.recon"] - recon).abs().max() < 1e-4, a
        assert (names[i]["hook_name"], names[i]["model_name"]) == ("blocks.2.hook_resid_post", "smollm2-135m")
        if a == "topk":
            assert names[i]["k"] == K  # not SAELens's default of 100


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_folders_load_in_saelab_with_saelens_outputs(tmp_path, arch) -> None:
    folder = tmp_path / arch
    saelens("write", str(folder), arch, str(D), str(N), str(K), "3")
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(2))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    saelens("read", str(tmp_path / "x.safetensors"), str(tmp_path / "out.safetensors"), str(folder))
    out = load_file(str(tmp_path / "out.safetensors"))
    sae = SAE.load(folder)
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.cfg.model_name == "tiny"
    with torch.no_grad():
        z = sae.encode(x)
        assert (out["0.z"] - z).abs().max() < 1e-4
        assert (out["0.recon"] - sae.decode(z)).abs().max() < 1e-4
    assert (out["0.z"] > 0).any()  # the comparison saw firing latents


def test_a_folder_saelens_wrote_goes_through_saelab_bench(tmp_path) -> None:
    """A TopK SAE saved by SAELens itself, as reading the one-layer model's residual stream, gets
    a report card: the splice evaluation and sparse probing run on it unchanged."""
    from helpers import run_cli, write_corpus

    folder = tmp_path / "saelens-topk"
    saelens("write", str(folder), "topk", "128", "256", "8", "5", "blocks.0.hook_resid_post", "one-layer")
    corpus = write_corpus(tmp_path / "corpus", n_docs=16, words=60)
    p = run_cli("bench", str(folder), "--out", str(tmp_path / "bench"), "--corpus", str(corpus), "--tokens",
                "256", "--per-class", "20", "--code-passages", "40", "--device", "cpu", "--no-progress")
    assert p.returncode == 0, p.stderr[-2000:]
    card = json.loads((tmp_path / "bench" / "saelens-topk.json").read_text())
    assert card["architecture"] == "topk" and card["model"] == "one-layer"
    assert card["metrics"]["core"]["l0"] == pytest.approx(8)  # SAELens's k, read from its cfg.json
    assert 0.5 <= card["metrics"]["sparse_probing"]["mean"]["baseline_accuracy"] <= 1
