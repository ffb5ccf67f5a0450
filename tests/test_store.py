"""The activation store: harvest round trip, resume, shuffling reader, damage detection."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli, write_corpus

from saelab.activations.harvest import ModelStream, activations, harvest
from saelab.activations.store import ActivationStore, open_store
from saelab.config import HarvestConfig, TextConfig
from saelab.data.text import text_batches
from saelab.errors import InputError, SaelabError

HOOKS = ["blocks.1.hook_resid_post", "blocks.3.mlp.hook_post"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=60, words=150)


def cfg(corpus: Path, **kw) -> HarvestConfig:
    base = dict(model="minilm-l6", hooks=HOOKS, corpus=str(corpus), tokens=3000, context_length=32,
                batch_size=4, dtype="float32", shard_rows=500, progress=False)
    return HarvestConfig(**{**base, **kw})


def shard_hashes(store: Path) -> list[str]:
    return [s["sha256"] for s in json.loads((store / "manifest.json").read_text())["shards"]]


def test_round_trip_equals_the_models_activations(tmp_path, corpus, minilm):
    c = cfg(corpus)
    paths = harvest(c, tmp_path / "s", lm=minilm)
    assert [p.name for p in paths] == HOOKS
    stores = [open_store(p) for p in paths]
    assert [s.d_in for s in stores] == [384, 1536]
    assert all(s.n_rows == 3000 for s in stores)
    assert len(stores[0].shards) >= 5
    m = stores[0].manifest
    assert (m["model"], m["hook_name"], m["context_length"], m["complete"]) == \
        ("minilm-l6", HOOKS[0], 32, True)
    # The stored rows are the model's activations at the content positions, in order.
    expected = {h: [] for h in HOOKS}
    n = 0
    for batch in text_batches(minilm, c, "train"):
        for h, rows in activations(minilm, HOOKS, batch).items():
            expected[h].append(rows)
        n += batch.n_content
        if n >= 3000:
            break
    for store, h in zip(stores, HOOKS, strict=True):
        got = torch.cat(list(store.rows(700)))
        torch.testing.assert_close(got, torch.cat(expected[h])[:3000])


def test_reader_shuffles_across_shards_and_resumes_exactly(tmp_path, corpus, minilm):
    (path,) = harvest(cfg(corpus, hooks=HOOKS[:1], tokens=4000), tmp_path / "s", lm=minilm)
    store = ActivationStore(path, buffer_rows=2048, chunk_rows=128)
    everything = torch.cat(list(store.rows(1000)))
    first = list(zip(range(12), store.batches(256, seed=3), strict=False))
    batches = [b for _, b in first]
    # one epoch covers every row exactly once (batches 0..14 hold 3840 of the 4000 rows)
    seen = torch.cat(batches)
    index = {tuple(r.tolist()): i for i, r in enumerate(everything[:, :8])}
    ids = [index[tuple(r.tolist())] for r in seen[:, :8]]
    assert len(set(ids)) == len(ids)
    # a batch mixes rows from several shards
    shard_of = np.searchsorted(store.offsets, ids[:256], side="right") - 1
    assert len(set(shard_of.tolist())) >= 3
    resumed = [b for _, b in zip(range(5), store.batches(256, seed=3, start_step=7), strict=False)]
    for a, b in zip(batches[7:], resumed, strict=True):
        assert torch.equal(a, b)
    # endless: the next epoch is a different order of the same rows
    many = list(zip(range(40), store.batches(256, seed=3), strict=False))
    assert len(many) == 40


def test_resume_after_interruption_gives_the_same_store(tmp_path, corpus, minilm, monkeypatch):
    c = cfg(corpus)
    harvest(c, tmp_path / "whole", lm=minilm)
    calls = {"n": 0}
    original = np.lib.format.write_array

    def crash_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the second shard of the second hook
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        harvest(c, tmp_path / "cut", lm=minilm)
    monkeypatch.setattr(np.lib.format, "write_array", original)
    # hook 0 has two shards, hook 1 one: resuming lines them up and continues
    assert len(shard_hashes(tmp_path / "cut" / HOOKS[0])) == 2
    assert len(shard_hashes(tmp_path / "cut" / HOOKS[1])) == 1
    assert not list((tmp_path / "cut").rglob("*.tmp"))
    harvest(c, tmp_path / "cut", lm=minilm)
    for h in HOOKS:
        assert shard_hashes(tmp_path / "cut" / h) == shard_hashes(tmp_path / "whole" / h)


def test_disk_full_leaves_only_complete_shards(tmp_path, corpus, minilm, monkeypatch):
    c = cfg(corpus, hooks=HOOKS[:1])
    original = np.lib.format.write_array
    calls = {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", full_disk)
    full = r"disk full while writing .*shard_00002\.npy; the store keeps its 2"
    with pytest.raises(SaelabError, match=full):
        harvest(c, tmp_path / "s", lm=minilm)
    monkeypatch.setattr(np.lib.format, "write_array", original)
    assert len(shard_hashes(tmp_path / "s")) == 2
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == \
        ["manifest.json", "shard_00000.npy", "shard_00001.npy"]
    with pytest.raises(InputError, match=r"store .*s is incomplete: its harvest stopped at [\d,]+ rows "
                       r"of the 3,000 asked; re-run the same harvest command .* or pass --allow-incomplete"):
        open_store(tmp_path / "s")
    store = open_store(tmp_path / "s", allow_incomplete=True)
    assert store.n_rows == sum(s["rows"] for s in store.shards) < 3000
    harvest(c, tmp_path / "s", lm=minilm)
    assert open_store(tmp_path / "s").n_rows == 3000


def test_train_refuses_an_unfinished_store_unless_allowed(tmp_path, corpus, minilm):
    (path,) = harvest(cfg(corpus, hooks=HOOKS[:1]), tmp_path / "s", lm=minilm)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(complete=False, target_tokens=6000)  # as a harvest stopped half way leaves it
    (path / "manifest.json").write_text(json.dumps(manifest))
    args = ["train", "--acts", str(path), "--arch", "topk", "--n-latents", "64", "--k", "4",
            "--tokens", "2000", "--batch-size", "100", "--no-progress", "--out", str(tmp_path / "sae")]
    r = run_cli(*args)
    assert_one_line_error(r, "is incomplete: its harvest stopped at 3,000 rows of the 6,000 asked",
                          "--allow-incomplete")
    assert not (tmp_path / "sae").exists()
    r = run_cli(*args, "--allow-incomplete")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sae" / "sae_weights.safetensors").is_file()


def test_rerunning_the_harvest_repairs_damaged_and_missing_shards(tmp_path, corpus, minilm):
    c = cfg(corpus, hooks=HOOKS[:1])
    (path,) = harvest(c, tmp_path / "s", lm=minilm)
    good = {p.name: p.read_bytes() for p in path.glob("shard_*.npy")}
    shard = path / "shard_00001.npy"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"shard_00001\.npy is corrupted"):
        list(open_store(path).rows(10_000))
    harvest(c, tmp_path / "s", lm=minilm)  # the advice the error gives
    assert {p.name: p.read_bytes() for p in path.glob("shard_*.npy")} == good
    assert open_store(path).n_rows == 3000
    list(open_store(path).rows(10_000))  # every shard verifies again
    (path / "shard_00003.npy").unlink()
    harvest(c, tmp_path / "s", lm=minilm)
    assert {p.name: p.read_bytes() for p in path.glob("shard_*.npy")} == good


def test_damaged_stores_name_the_bad_shard(tmp_path, corpus, minilm):
    (path,) = harvest(cfg(corpus, hooks=HOOKS[:1]), tmp_path / "s", lm=minilm)
    shard = path / "shard_00001.npy"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = open_store(path)  # the cheap checks pass: same size and header
    with pytest.raises(InputError, match=r"shard shard_00001\.npy is corrupted \(sha256"):
        list(store.rows(10_000))
    with pytest.raises(InputError, match=r"shard_00001\.npy is corrupted"):
        for _ in zip(range(100), store.batches(64, seed=0), strict=False):
            pass
    shard.write_bytes(bytes(data[:-1000]))
    with pytest.raises(InputError, match=r"shard_00001\.npy is truncated"):
        open_store(path)
    manifest = json.loads((path / "manifest.json").read_text())
    shard.write_bytes(bytes(data))
    manifest["shards"][0]["rows"] += 1
    manifest["token_count"] += 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"shard shard_00000\.npy holds \(\d+, 384\) .* manifest lists"):
        open_store(path)
    manifest["shards"][0]["rows"] -= 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="token_count 3001 disagrees with its shards"):
        open_store(path)
    (path / "shard_00002.npy").unlink()
    manifest["token_count"] -= 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"shard_00002\.npy is listed in the manifest but missing"):
        open_store(path)


def test_changed_settings_refuse_to_resume(tmp_path, corpus, minilm):
    harvest(cfg(corpus, hooks=HOOKS[:1], tokens=600), tmp_path / "s", lm=minilm)
    with pytest.raises(InputError, match=r"other settings: context_length \(32 -> 64\)"):
        harvest(cfg(corpus, hooks=HOOKS[:1], context_length=64), tmp_path / "s", lm=minilm)
    # a larger --tokens extends the store
    harvest(cfg(corpus, hooks=HOOKS[:1], tokens=1500), tmp_path / "s", lm=minilm)
    assert open_store(tmp_path / "s").n_rows == 1500


def test_model_stream_is_deterministic_and_resumable(corpus, minilm):
    text = TextConfig(corpus=str(corpus), context_length=32, batch_size=4)
    stream = ModelStream(minilm, HOOKS[0], text, tokens=10_000, buffer_rows=600)
    batches = [b for _, b in zip(range(14), stream.batches(100, seed=1), strict=False)]
    resumed = [b for _, b in zip(range(4), stream.batches(100, seed=1, start_step=10), strict=False)]
    for a, b in zip(batches[10:], resumed, strict=True):
        assert torch.equal(a, b)
    assert stream.sample(50, 0).shape == (50, 384)
    assert sum(r.shape[0] for r in stream.rows(128, limit=500)) == 500


@pytest.mark.slow
def test_killed_harvest_cli_resumes(tmp_path, corpus):
    """SIGKILL a real `saelab harvest` after its first shards, re-run it: the same bytes."""
    args = ["harvest", "--model", "minilm-l6", "--hook", HOOKS[0], "--corpus", str(corpus),
            "--tokens", "6000", "--context-length", "32", "--batch-size", "2", "--shard-rows", "300",
            "--dtype", "float16", "--no-progress"]
    assert run_cli(*args, "--out", str(tmp_path / "whole")).returncode == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "saelab", *args, "--out", str(cut)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (cut / "manifest.json").exists() and len(shard_hashes(cut)) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(shard_hashes(cut))
    assert 3 <= n_before < len(shard_hashes(tmp_path / "whole"))
    done = run_cli(*args, "--out", str(cut))
    assert done.returncode == 0, done.stderr
    assert shard_hashes(cut) == shard_hashes(tmp_path / "whole")


def test_cli_bad_input(tmp_path, corpus):
    out = str(tmp_path / "s")
    base = ["harvest", "--tokens", "100", "--no-progress", "--out", out]
    assert_one_line_error(run_cli(*base, "--model", "minilm-l6", "--hook", "blocks.9.hook_mlp_out",
                                  "--corpus", str(corpus)),
                          "unknown hook point 'blocks.9.hook_mlp_out'", "blocks 0-5", "hook_resid_post")
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "bert"}')
    assert_one_line_error(run_cli(*base, "--model", str(no_weights), "--hook", HOOKS[0],
                                  "--corpus", str(corpus)), "no model weights found")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli(*base, "--model", "minilm-l6", "--hook", HOOKS[0],
                                  "--corpus", str(tmp_path / "empty")), "holds no files")
    assert_one_line_error(run_cli("train", "--acts", str(tmp_path / "empty"), "--out", out),
                          "not an activation store")


def test_train_from_store_and_from_the_model_stream(tmp_path, corpus, minilm):
    (store,) = harvest(cfg(corpus, hooks=HOOKS[:1], tokens=3000), tmp_path / "s", lm=minilm)
    small = ["--n-latents", "512", "--k", "8", "--tokens", "6000", "--batch-size", "500", "--no-progress"]
    proc = run_cli("train", "--acts", str(store), "--out", str(tmp_path / "a"), *small)
    assert proc.returncode == 0, proc.stderr
    cfg_json = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert cfg_json["meta"] == {"model_name": "minilm-l6", "hook_name": HOOKS[0], "hook_layer": 1,
                                "hook_head_index": None}
    ev = run_cli("eval", str(tmp_path / "a"), "--acts", str(store), "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["fvu"] < 0.9
    proc = run_cli("train", "--model", "minilm-l6", "--hook", HOOKS[0], "--corpus", str(corpus),
                   "--context-length", "32", "--out", str(tmp_path / "b"), *small)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "b" / "cfg.json").read_text())["meta"]["hook_name"] == HOOKS[0]
    (other,) = harvest(cfg(corpus, hooks=["blocks.2.hook_resid_post"], tokens=600), tmp_path / "o",
                       lm=minilm)
    assert_one_line_error(run_cli("eval", str(tmp_path / "a"), "--acts", str(other)),
                          "holds blocks.2.hook_resid_post", f"reads {HOOKS[0]}")
