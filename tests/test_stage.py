"""One way to reuse a finished stage: the settings' fingerprint and the completion marker.

A second run of a finished stage with the same settings reuses it without loading the model;
a changed setting that decides the result makes it again; a setting that does not (the
device, the progress bar) does not."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import run_cli, write_corpus

from saelab import stage
from saelab.activations.source import open_source
from saelab.analyse.atlasdb import Atlas
from saelab.errors import InputError
from saelab.train.config import TrainConfig
from saelab.train.trainer import CHECKPOINT, Trainer, run_settings


def test_settings_fingerprint_free_keys_and_named_changes():
    a = stage.Settings.of("run", {"lr": 1e-3, "sae": {"k": 4}, "device": "cpu"}, free={"device"})
    b = stage.Settings.of("run", {"lr": 1e-3, "sae": {"k": 4}, "device": "cuda"}, free={"device"})
    c = stage.Settings.of("run", {"lr": 1e-3, "sae": {"k": 8}, "device": "cpu"}, free={"device"})
    assert a.values == {"lr": 1e-3, "sae.k": 4}
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert c.changes(a) == ["sae.k (4 -> 8)"]
    assert stage.Settings("run", {"hooks": ("a", "b")}).changes({"hooks": ["a", "b"]}) == []
    with pytest.raises(InputError, match=r"runs/x holds a run with other settings: sae\.k \(4 -> 8\)"):
        c.require_same(a, "runs/x")


def test_marker_names_its_settings_and_is_written_last(tmp_path):
    s = stage.Settings("atlas", {"tokens": 10})
    out = tmp_path / "a.atlas"
    assert stage.finished(out, s) is None  # nothing there
    out.write_bytes(b"x")
    assert stage.finished(out, s) is None  # a result without its marker is not finished
    stage.mark_finished(out, s, {"features": 3})
    assert stage.marker_path(out) == tmp_path / "a.atlas.stage.json"
    assert stage.finished(out, s) == {"features": 3}
    assert stage.finished(out, stage.Settings("atlas", {"tokens": 11})) is None
    assert stage.recorded_settings(out) == {"tokens": 10}
    folder = tmp_path / "sae"
    folder.mkdir()
    stage.mark_finished(folder, s)
    assert (folder / "stage.json").is_file() and stage.finished(folder, s) == {}
    stage.clear(folder)
    assert stage.finished(folder, s) is None


def test_a_finished_training_run_is_reused_without_its_checkpoint(tmp_path):
    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(architecture="topk", n_latents=64, k=4, tokens=8192, batch_size=512, progress=False)
    out = tmp_path / "sae"
    first = Trainer(open_source(x), cfg, out).run()
    marker = json.loads((out / "stage.json").read_text())
    assert marker["fingerprint"] == run_settings(cfg).fingerprint and marker["result"]["n_latents"] == 64
    (out / CHECKPOINT).unlink()  # 3x the SAE's size: users delete it once a run is done
    again = Trainer(open_source(x), cfg.model_copy(update={"device": "cpu", "log_every_steps": 3}), out)
    sae = again.run()
    assert again.reused is not None and not (out / CHECKPOINT).exists()  # nothing was trained
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), sae.state_dict().values(),
                                                 strict=True))
    # a setting that decides the result: a new run (the old marker is gone while it trains)
    other = Trainer(open_source(x), cfg.model_copy(update={"seed": 1}), out)
    assert not other.begin() and not (out / "stage.json").exists()


def test_a_finished_harvest_is_reused_without_loading_the_model(tmp_path, minilm, monkeypatch):
    from saelab.activations import harvest as harvest_mod
    from saelab.config import HarvestConfig

    corpus = write_corpus(tmp_path / "corpus", n_docs=20, words=80)
    hc = HarvestConfig(model="minilm-l6", hooks=["blocks.1.hook_resid_post"], corpus=str(corpus),
                       tokens=800, context_length=32, batch_size=4, dtype="float32", shard_rows=300,
                       progress=False)
    (store,) = harvest_mod.harvest(hc, tmp_path / "s", lm=minilm)
    manifest = (store / "manifest.json").read_text()

    def no_model(*a, **k):
        raise AssertionError("the model was loaded for a finished harvest")

    monkeypatch.setattr(harvest_mod, "open_model", no_model)
    assert harvest_mod.harvest(hc.model_copy(update={"batch_size": 8}), tmp_path / "s") == [store]
    assert (store / "manifest.json").read_text() == manifest
    # more tokens extend the store: the model is needed again
    with pytest.raises(AssertionError, match="the model was loaded"):
        harvest_mod.harvest(hc.model_copy(update={"tokens": 1200}), tmp_path / "s")


@pytest.mark.slow
def test_saelab_atlas_on_a_finished_atlas_reuses_it(small_atlas):
    """`saelab atlas` with the settings the atlas was built with returns it as it is (no model,
    no pass); a setting that changes the atlas rebuilds it."""
    path, cfg = small_atlas["path"], small_atlas["cfg"]
    before = path.stat().st_mtime_ns
    common = ["atlas", str(small_atlas["sae"]), "--corpus", cfg.corpus, "--context-length", "64",
              "--heldout-fraction", "0.5", "--eval-tokens", "256", "--no-progress"]
    p = run_cli(*common, "--out", str(path), "--batch-size", "8", timeout=300)
    assert p.returncode == 0, p.stderr
    assert "already built with these settings, reused" in p.stdout
    assert path.stat().st_mtime_ns == before
    copy = small_atlas["root"] / "other.atlas"  # the same atlas and marker, elsewhere
    shutil.copy(path, copy)
    shutil.copy(stage.marker_path(path), stage.marker_path(copy))
    p = run_cli(*common, "--out", str(copy), "--top-examples", "4", timeout=600)
    assert p.returncode == 0 and "reused" not in p.stdout, p.stderr
    assert stage.recorded_settings(copy)["top_examples"] == 4
    assert max(len(Atlas(copy).page(f).top) for f in range(20)) == 4


def test_saelab_toy_reuses_a_finished_sweep(tmp_path):
    args = ["toy", "--quick", "--tokens", "20000", "--ratios", "1", "--ks", "1", "--l1-coefficients", "1",
            "--train-rows", "5000", "--eval-rows", "1000", "--out", str(tmp_path / "toy")]
    first = run_cli(*args, timeout=600)
    assert first.returncode == 0 and "reused" not in first.stdout, first.stderr
    csv = (tmp_path / "toy" / "sweep.csv").read_text()
    again = run_cli(*args, timeout=600)
    assert again.returncode == 0 and "reused: the sweep with these settings" in again.stdout
    assert (tmp_path / "toy" / "sweep.csv").read_text() == csv
    other = run_cli(*args[:-2], "--seed", "1", "--out", str(tmp_path / "toy"), timeout=600)
    assert other.returncode == 0 and "reused" not in other.stdout
