"""Reading the SAE folders of EleutherAI sparsify (1.3.3) and dictionary_learning (0.1.0), tested
against each library's own save format and forward pass, run in its own venv (``make
interop-envs``; torch 2.13.0 pinned by tests/interop/constraints.txt). The folders then go
through saelab eval, atlas and steer unchanged."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run_cli, write_corpus
from safetensors.torch import load_file, save_file

from saelab.sae.base import SAE

ROOT = Path(__file__).parents[1]
SIDES = ROOT / "tests" / "interop"
VENVS = {"sparsify": ".venv-sparsify", "dictlearn": ".venv-dictlearn"}
D, N, K = 128, 256, 8  # d_model of the one-layer model, so the folders also run in it
pytestmark = pytest.mark.slow
DICT_CLASSES = {"AutoEncoder": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
                "MatryoshkaBatchTopKSAE": "matryoshka", "JumpReluAutoEncoder": "jumprelu",
                "GatedAutoEncoder": "gated"}


def side(lib: str, folder: Path, x: torch.Tensor, *args: str) -> dict[str, torch.Tensor]:
    """Run the library's side script: it writes its SAEs under ``folder`` and returns its own
    latents and outputs on ``x``."""
    python = Path(os.environ.get(f"SAELAB_{lib.upper()}_PYTHON", ROOT / VENVS[lib] / "bin" / "python"))
    if not python.exists():
        pytest.fail(f"{python} is missing: `make interop-envs` builds it (make test does)")
    save_file({"x": x}, str(folder.parent / f"{lib}-x.safetensors"))
    out = folder.parent / f"{lib}-out.safetensors"
    p = subprocess.run([str(python), str(SIDES / f"{lib}_side.py"), str(folder),
                        str(folder.parent / f"{lib}-x.safetensors"), str(out), *args],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return load_file(str(out))


def _same(sae: SAE, x: torch.Tensor, z: torch.Tensor, recon: torch.Tensor, what: str) -> None:
    with torch.no_grad():
        ours_z, ours = sae.encode(x), sae(x)
    assert (ours_z > 0).any(), what  # latents that fire: not a vacuous comparison
    assert (ours_z - z).abs().max() < 1e-4, what
    assert (ours - recon).abs().max() < 1e-4, what


X = torch.randn(256, D, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sparsify_run(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A sparsify run on the one-layer model (GPT-2 module names: h.0, h.0.mlp, h.0.attn), saved
    and run by sparsify itself."""
    root = tmp_path_factory.mktemp("sparsify")
    return root / "run", side("sparsify", root / "run", X, str(D), str(N), str(K), "1", "one-layer", "h")


@pytest.fixture(scope="module")
def dictlearn_root(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("dictlearn")
    return root / "dl", side("dictlearn", root / "dl", X, str(D), str(N), str(K), "2", "one-layer")


def test_sparsify_folders_load_with_sparsify_outputs(sparsify_run) -> None:
    run, out = sparsify_run
    expect = {"h.0": ("topk", "blocks.0.hook_resid_post", None),
              "h.0.mlp": ("transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"),
              "h.0.attn": ("topk", "blocks.0.hook_attn_out", None)}
    for name, (arch, hook, hook_out) in expect.items():
        sae = SAE.load(run / name)
        assert (sae.architecture, sae.cfg.hook_name, sae.cfg.hook_name_out) == (arch, hook, hook_out)
        assert (sae.cfg.model_name, sae.cfg.k, sae.n_latents) == ("one-layer", K, N)
        _same(sae, X, out[f"{name}.z"], out[f"{name}.recon"], name)
    assert SAE.load(run / "h.0.mlp").has_skip  # the skip connection is kept


def test_sparsify_settings_saelab_cannot_reproduce_are_refused(sparsify_run, tmp_path) -> None:
    import shutil

    run = sparsify_run[0]
    with pytest.raises(Exception, match=r"pass one of them \(h\.0, h\.0\.attn, h\.0\.mlp\)"):
        SAE.load(run)
    folder = tmp_path / "h.0"
    shutil.copytree(run / "h.0", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    for change, needle in (({"activation": "groupmax"}, "activation = 'groupmax'"),
                           ({"skip_connection": True}, "skip_connection = true without transcode")):
        (folder / "cfg.json").write_text(json.dumps({**cfg, **change}))
        assert_one_line_error(run_cli("eval", str(folder), "--acts", str(tmp_path / "x.npy")), needle)


def test_dictionary_learning_folders_load_with_its_outputs(dictlearn_root, tmp_path) -> None:
    import shutil

    root, out = dictlearn_root
    for cls, arch in DICT_CLASSES.items():
        sae = SAE.load(root / cls)
        assert sae.architecture == arch, cls
        assert (sae.cfg.hook_name, sae.cfg.model_name) == ("blocks.0.hook_resid_post", "one-layer")
        _same(sae, X, out[f"{cls}.z"], out[f"{cls}.recon"], cls)
        # Saved by saelab, it stays the same SAE (and so loads in SAELens, tests/test_saelens.py).
        sae.save(tmp_path / "again" / cls)
        _same(SAE.load(tmp_path / "again" / cls), X, out[f"{cls}.z"], out[f"{cls}.recon"], cls)
    shutil.copy(root / "AutoEncoderTopK" / "ae.pt", tmp_path / "ae.pt")  # without its config.json
    with pytest.raises(Exception, match=r"no config\.json naming its dict_class"):
        SAE.load(tmp_path)


def test_foreign_folders_go_through_eval_atlas_and_steer_unchanged(sparsify_run, dictlearn_root,
                                                                   tmp_path) -> None:
    """SAEs of both libraries on the one-layer model (d_model 128): saelab eval splices them in,
    steer clamps one of their features, the atlas builds and the viewer shows a feature page."""
    from fastapi.testclient import TestClient

    from saelab.analyse.atlas import build_atlas
    from saelab.config import AtlasConfig
    from saelab.view.server import create_app

    run, dl = sparsify_run[0], dictlearn_root[0]
    corpus = write_corpus(tmp_path / "corpus", n_docs=16, words=60)
    p = run_cli("eval", str(dl / "AutoEncoderTopK"), "--corpus", str(corpus), "--tokens", "512",
                "--context-length", "64", "--heldout-fraction", "0.5", "--json", "--device", "cpu")
    assert p.returncode == 0, p.stderr[-2000:]
    metrics = json.loads(p.stdout)
    assert metrics["hook_name"] == "blocks.0.hook_resid_post" and metrics["tokens"] >= 400
    assert metrics["l0"] == pytest.approx(K, abs=1e-6)  # k as the library saved it
    p = run_cli("steer", "--sae", str(run / "h.0"), "--feature", "3", "--clamp", "40",
                "--prompt", "The cat sat on", "--max-new-tokens", "4", "--device", "cpu")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "steered" in p.stdout.lower()
    cfg = AtlasConfig(corpus=str(corpus), context_length=64, batch_size=4, heldout_fraction=0.5,
                      eval_tokens=128, progress=False)
    atlas = build_atlas(dl / "BatchTopKSAE", cfg, tmp_path / "dl.atlas").path
    client = TestClient(create_app(atlas, device="cpu"), base_url="http://127.0.0.1")
    listing = client.get("/api/features").json()
    assert listing["total"] == N
    first = listing["items"][0]["id"]
    page = client.get(f"/api/feature/{first}")
    assert page.status_code == 200 and page.json()["id"] == first
    assert client.get("/api/meta").json()["sae"]["cfg"]["sae"]["architecture"] == "batchtopk"
