"""Nothing users have breaks: format-1 folders and checkpoints (saelab 0.4, written before each
architecture owned its config) load, resume, and the same settings and seed train the same
weights, bit for bit, as they did then."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saelab import SAE, TrainConfig
from saelab.activations.source import MatrixSource
from saelab.config_base import FORMAT_VERSION
from saelab.sae.config import migrate_train_v1
from saelab.train.trainer import Trainer

V1 = Path(__file__).parent / "fixtures" / "format_v1"
MANIFEST = json.loads((V1 / "manifest.json").read_text())
ARCHS = list(MANIFEST["runs"])


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.from_numpy(np.load(V1 / "x.npy"))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(MANIFEST["threads"])
    yield
    torch.set_num_threads(before)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    same_cpu = torch.backends.cpu.get_cpu_capability() == MANIFEST["cpu_capability"]
    for name in a:
        if same_cpu:  # the same arithmetic: the same bits
            assert torch.equal(a[name], b[name]), (what, name, float((a[name] - b[name]).abs().max()))
        else:  # another vector unit rounds sums in another order
            assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), (what, name)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_settings_and_seed_train_the_same_weights_as_format_1(arch, x, tmp_path, one_thread):
    # the flat 0.4 settings are still accepted; saelab 0.4 trained every architecture with Adam
    cfg = TrainConfig(**MANIFEST["runs"][arch], optimizer="adam")
    assert cfg.architecture == arch
    Trainer(MatrixSource(x), cfg, tmp_path / arch).run()
    assert_same_weights(load_file(tmp_path / arch / "sae_weights.safetensors"),
                        load_file(V1 / arch / "sae_weights.safetensors"), arch)
    saved = json.loads((tmp_path / arch / "cfg.json").read_text())["saelab"]
    assert saved["format_version"] == FORMAT_VERSION == 2
    assert saved["sae"]["architecture"] == arch


@pytest.mark.parametrize("arch", ARCHS)
def test_a_format_1_folder_loads_with_its_settings(arch, x):
    sae = SAE.load(V1 / arch)
    assert sae.architecture == arch and sae.d_in == 16 and sae.n_latents == 40
    run = MANIFEST["runs"][arch]
    if "k" in run:
        assert sae.cfg.k == run["k"]
    if arch == "jumprelu":
        assert sae.cfg.sae.init_threshold == run["jumprelu_init_threshold"]
    if arch == "relu":
        assert sae.cfg.sae.resample_every_steps == run["resample_every_steps"]
    # the training settings it records are read in the new layout
    assert TrainConfig.model_validate(sae.cfg.train).architecture == arch
    with torch.no_grad():
        assert torch.isfinite(sae(x[:64])).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_format_1_checkpoint_resumes_to_the_same_end(arch, x, tmp_path, one_thread):
    out = tmp_path / arch
    shutil.copytree(V1 / f"{arch}-partial", out)
    cfg = TrainConfig(**MANIFEST["runs"][arch], optimizer="adam")
    t = Trainer(MatrixSource(x), cfg, out)
    assert not t.begin() and t.step == 6
    t._release_memory()
    Trainer(MatrixSource(x), cfg, out).run()
    assert_same_weights(load_file(out / "sae_weights.safetensors"),
                        load_file(V1 / arch / "sae_weights.safetensors"), arch)


def test_a_format_1_checkpoint_with_other_settings_is_refused(x, tmp_path):
    out = tmp_path / "topk"
    shutil.copytree(V1 / "topk-partial", out)
    cfg = TrainConfig(**{**MANIFEST["runs"]["topk"], "k": 5}, optimizer="adam")
    with pytest.raises(Exception, match=r"sae\.k \(4 -> 5\)"):
        Trainer(MatrixSource(x), cfg, out).begin()


def test_a_format_1_topk_checkpoint_resumed_at_the_new_default_optimizer_is_refused_naming_it(x, tmp_path):
    """saelab 0.5 trained TopK with Adam; resuming its checkpoint under today's default (signum)
    would mix two optimisers' states: refused, with the flag that resumes it."""
    out = tmp_path / "topk"
    shutil.copytree(V1 / "topk-partial", out)
    with pytest.raises(Exception, match=r"optimizer \('adam' -> 'signum'\).*--optimizer adam"):
        Trainer(MatrixSource(x), TrainConfig(**MANIFEST["runs"]["topk"]), out).begin()


def test_migrating_a_flat_config_drops_other_architectures_settings():
    flat = {"architecture": "jumprelu", "k": 32, "l1_coefficient": 5.0, "l0_coefficient": 0.1,
            "jumprelu_bandwidth": 0.02, "l1_warmup_fraction": 0.1, "tokens": 100}
    new = migrate_train_v1(flat)
    assert new == {"tokens": 100, "sae": {"architecture": "jumprelu", "l0_coefficient": 0.1,
                                          "bandwidth": 0.02, "coefficient_warmup_fraction": 0.1}}
