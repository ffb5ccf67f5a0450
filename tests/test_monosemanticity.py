"""Issue 7: a one-layer LM trained here (`saelab lm train`), the monosemanticity study on it
(a sweep of two sizes, neurons against features, relatives in the viewer) and `saelab
split` finding a planted split. Everything runs on a tiny model trained in the test."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import chromium, run_cli, serving, write_corpus
from safetensors.torch import load_file

import saelab.lm.train as lm_train
from saelab.analyse.atlasdb import Atlas
from saelab.analyse.page import Example
from saelab.analyse.split import families
from saelab.config import LMConfig
from saelab.lm.train import train_lm
from saelab.sae.base import create
from saelab.sae.config import SAEConfig
from saelab.studies.monosemanticity import MonosemanticityConfig, run_study, token_concentration
from saelab.view.server import serve_atlases

TINY = {"vocab_size": 320, "d_model": 32, "n_heads": 2, "d_mlp": 64, "context_length": 32,
        "batch_size": 8, "tokens": 40_000, "eval_every_steps": 20, "eval_tokens": 4096,
        "heldout_fraction": 0.2, "progress": False}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    corpus = write_corpus(root / "corpus", n_docs=80, words=600)
    cfg = LMConfig(corpus=str(corpus), **TINY)
    result = train_lm(cfg, root / "run")
    return {"root": root, "corpus": corpus, "cfg": cfg, "result": result}


def test_lm_train_loss_falls_and_the_model_loads_with_hooks(tiny_lm):
    from saelab.activations.hooks import hook_width
    from saelab.models import load_model

    r = tiny_lm["result"]
    curve = [p["heldout_loss"] for p in r.info["heldout_curve"]]
    assert curve[0] > 4.0 and r.heldout_loss < curve[0] - 1.0, curve  # ln(320) = 5.8 at the start
    # the float16 model users load measures what the run reported
    assert abs(r.info["heldout_loss"] - r.info["heldout_loss_float32_weights"]) < 0.01
    weights = load_file(r.folder / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    lm = load_model(r.folder)
    assert lm.n_layers == 1 and lm.causal
    assert hook_width(lm.model, "blocks.0.mlp.hook_post") == 64
    # A second run of the same command finds the finished model.
    again = train_lm(tiny_lm["cfg"], tiny_lm["root"] / "run")
    assert again.heldout_loss == r.heldout_loss


def test_lm_train_resumes_to_the_same_weights(tiny_lm, tmp_path, monkeypatch):
    cfg = tiny_lm["cfg"].model_copy(update={"checkpoint_every_steps": 10})
    real = lm_train.batch_at

    def interrupt(tokens, c, step, bos):
        if step == 35:
            raise KeyboardInterrupt
        return real(tokens, c, step, bos)

    monkeypatch.setattr(lm_train, "batch_at", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_lm(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()
    monkeypatch.setattr(lm_train, "batch_at", real)
    resumed = train_lm(cfg, tmp_path / "run")
    a = load_file(tiny_lm["result"].folder / "model.safetensors")
    b = load_file(resumed.folder / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lm_train_refuses_other_settings_in_the_same_folder(tiny_lm):
    p = run_cli("lm", "train", "--out", str(tiny_lm["root"] / "run"), "--corpus", str(tiny_lm["corpus"]),
                "--vocab-size", "400", "--no-progress")
    assert p.returncode == 1 and "vocab_size (320 -> 400)" in p.stderr


def _planted(d: int = 16, seed: int = 0):
    """A small dictionary whose feature 0 is d1 + d2 (normalised) and a large one holding d1
    and d2 as separate features, plus unrelated features in both."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0].T  # orthonormal rows
    small = create(SAEConfig(architecture="relu", d_in=d, n_latents=4))
    large = create(SAEConfig(architecture="relu", d_in=d, n_latents=8))
    small_dirs = torch.stack([(basis[0] + basis[1]) / 2**0.5, basis[2], basis[3], basis[4]])
    large_dirs = torch.stack([basis[5], basis[2], basis[0], basis[6], basis[3], basis[1], basis[4], basis[7]])
    with torch.no_grad():
        for sae, dirs in ((small, small_dirs), (large, large_dirs)):
            sae.W_dec.copy_(dirs)
            sae.W_enc.copy_(dirs.T)
            sae.b_enc.zero_()
            sae.b_dec.zero_()
    # data: d1 and d2 fire on different rows, other directions now and then
    n = 4000
    which = torch.randint(0, 2, (n,), generator=g)
    amp = torch.rand(n, generator=g) + 0.5
    rows = amp[:, None] * basis[which]
    for other in (2, 6):
        rows += (torch.rand(n, 1, generator=g) < 0.3) * basis[other]
    return small, large, rows


def test_split_finds_a_planted_split(tmp_path):
    small, large, rows = _planted()
    (fam,) = families(small, large, [0], min_cosine=0.4, rows=rows)
    assert sorted(d.feature for d in fam.descendants) == [2, 5]
    assert all(abs(d.cosine - 2**-0.5) < 1e-5 for d in fam.descendants)
    assert fam.family_cosine > 0.99  # the parent is the sum of its two children
    assert fam.family_correlation is not None and fam.family_correlation > 0.99
    # Without --feature: the only family with two descendants is feature 0's.
    top = families(small, large, None, min_cosine=0.4, rows=rows)
    assert [f.parent for f in top] == [0]
    small.save(tmp_path / "small")
    large.save(tmp_path / "large")
    torch.save(rows, tmp_path / "rows.pt")
    from safetensors.torch import save_file

    save_file({"activations": rows.contiguous()}, str(tmp_path / "rows.safetensors"))
    p = run_cli("split", str(tmp_path / "small"), str(tmp_path / "large"), "--acts",
                str(tmp_path / "rows.safetensors"))
    assert p.returncode == 0, p.stderr
    assert "#0 " in p.stdout and "-> #2 " in p.stdout and "-> #5 " in p.stdout
    p = run_cli("split", str(tmp_path / "small"), str(tmp_path / "large"), "--feature", "9")
    assert p.returncode == 1 and "feature 9 is not in the smaller dictionary" in p.stderr


def test_token_concentration():
    same = [Example(act=1.0, peak=1, t=[5, 7], a=[0.0, 1.0])] * 4
    assert token_concentration(same) == 1.0
    each = [Example(act=1.0, peak=0, t=[i], a=[1.0]) for i in range(4)]
    assert abs(token_concentration(each)) < 1e-9


@pytest.mark.slow
def test_study_on_a_tiny_model_then_the_viewer(tiny_lm, tmp_path):
    cfg = MonosemanticityConfig(
        model=str(tiny_lm["result"].folder), corpus=str(tiny_lm["corpus"]), context_length=32,
        tokens=16_384, heldout_rows=4096, sizes=[1, 2], family_sizes=[1, 2], k=4, batch_size=256,
        dead_after_tokens=4096, eval_tokens=512, compare_size=2, atlas_tokens=4096, detect_tokens=2048,
        progress=False, device="cpu")
    r = run_study(cfg, tmp_path / "study")
    out = tmp_path / "study"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["dictionary"] for r in rows) == ["relu-1x", "relu-2x", "topk-1x", "topk-2x"]
    for row in rows:
        assert 0 <= float(row["fvu"]) < 1 and float(row["l0"]) > 0
        assert -1 < float(row["ce_recovered_zero"]) <= 1.05
    topk = {row["dictionary"]: row for row in rows if row["dictionary"].startswith("topk")}
    assert abs(float(topk["topk-1x"]["l0"]) - 4) < 0.01
    assert float(topk["topk-2x"]["fvu"]) < 0.9
    for f in ("sizes.png", "neurons_vs_features.png", "results.md", "splits.md", "splits.json", "study.json"):
        assert (out / f).stat().st_size > 0, f
    s = r["neurons_vs_features"]
    assert s["neurons"]["label_confidence"]["n"] > 0 and s["features"]["label_confidence"]["n"] > 0
    neurons = Atlas(out / "atlas" / "neurons.atlas")
    assert neurons.n_features == 64
    feats = Atlas(out / "atlas" / "topk-2x.atlas")
    rel = feats.relatives(0)
    assert {x["dictionary"] for x in rel} == {"neurons", "relu-1x", "relu-2x", "topk-1x"}
    assert all(x["label"] for x in rel if x["dictionary"] in ("neurons", "topk-1x"))  # atlases exist
    # A second run reuses every stage.
    again = run_study(cfg, out)
    assert again["results"] == r["results"] and again["seconds"]["total"] < r["seconds"]["total"]

    books = out / "atlas"
    app = serve_atlases(books / "topk-2x.atlas",
                        {"neurons": books / "neurons.atlas", "topk-1x": books / "topk-1x.atlas"}, live=False)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        meta = c.get("/api/meta").json()
        assert meta["current"] == "topk-2x" and meta["dictionaries"]["neurons"] == "/d/neurons/"
        sub = c.get("/d/neurons/api/meta").json()
        assert sub["current"] == "neurons" and sub["n_features"] == 64
        assert c.get("/d/neurons", follow_redirects=False).headers["location"] == "/d/neurons/"
        items = c.get("/api/relatives/0").json()["items"]
        served = {x["dictionary"]: x["url"] for x in items}
        assert served["neurons"] == "/d/neurons/" and served["relu-1x"] is None
        assert c.get("/api/relatives/999").status_code == 404

    target = next(x for x in rel if x["dictionary"] == "neurons")
    with serving(app) as url, chromium() as browser:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{url}/#/f/0")
        page.wait_for_selector("#relatives")
        text = page.inner_text("#relatives")
        assert "neurons" in text and f"#{target['feature']}" in text
        assert "neurons" in page.inner_text("#dicts")
        page.click(f"#relatives a[href='/d/neurons/#/f/{target['feature']}']")
        page.wait_for_selector("#subtitle:has-text('64 features')")
        page.wait_for_selector("#feature-label")
        assert page.inner_text("h1").startswith(f"Feature #{target['feature']}")
        assert not errors, errors
    json.dumps(r)  # the study's summary is plain JSON
