"""The feature atlas on the real SmolLM2: its statistics equal a brute-force pass, a killed
build resumes to the same file, logit effects match the unembedding, the explainer talks
to an OpenAI-compatible server, and the static export holds every feature."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli

from saelab.activations.hooks import run_hooked, unembedding
from saelab.analyse import atlas as atlas_mod
from saelab.analyse.atlas import build_atlas
from saelab.analyse.atlasdb import Atlas
from saelab.analyse.explain import auto_label
from saelab.data.text import text_batches
from saelab.sae.base import SAE
from saelab.view.export import export_html

pytestmark = pytest.mark.slow


def brute_force(smollm, sae: SAE, cfg) -> torch.Tensor:
    """Latents [tokens, F] of every held-out content token, computed directly."""
    zs = []
    with torch.no_grad():
        for b in text_batches(smollm, cfg, "heldout"):
            cap, _ = run_hooked(smollm.model, b.input_ids, b.attention_mask, capture=[sae.cfg.hook_name])
            zs.append(sae.encode(cap[sae.cfg.hook_name][b.content_mask].float()))
    return torch.cat(zs)


def test_atlas_statistics_equal_a_brute_force_pass(small_atlas, smollm):
    atlas = Atlas(small_atlas["path"])
    sae = SAE.load(small_atlas["sae"])
    z = brute_force(smollm, sae, small_atlas["cfg"])
    assert atlas.meta["tokens"] == z.shape[0] == small_atlas["result"].tokens
    count = (z > 0).sum(0)
    zmax = z.max(0).values
    rows = dict(atlas._db().execute("SELECT id, count FROM features").fetchall())
    assert [rows[i] for i in range(sae.n_latents)] == count.tolist()
    assert atlas.meta["metrics"]["atlas_l0"] == pytest.approx(16.0)
    for f in torch.argsort(count, descending=True)[:20].tolist():
        page = atlas.page(f)
        assert page.count == int(count[f])
        assert page.density == pytest.approx(float(count[f]) / z.shape[0])
        assert page.max_act == pytest.approx(float(zmax[f]), rel=1e-5)
        top = page.top
        assert top and top[0].act == pytest.approx(float(zmax[f]), rel=1e-5)
        assert [e.act for e in top] == sorted((e.act for e in top), reverse=True)
        for e in top:  # the peak token carries the example's activation
            assert e.a[e.peak] == pytest.approx(e.act, rel=2e-3)
        assert sum(page.hist) == int(count[f])
        fired = set(z[:, f][z[:, f] > 0].tolist())
        lows = [b.lo for b in page.bands]
        assert lows == sorted(lows)
        for b in page.bands:  # quantile-band examples are real firings of this feature
            for e in b.examples:
                assert e.act in fired and e.a[e.peak] == pytest.approx(e.act, rel=2e-3)
        assert len(page.neighbours) == 10 and page.labels
    # a histogram of all features' log density, and the splice metrics, for the global page
    dh = atlas.meta["density_hist"]
    assert sum(dh["counts"]) + dh["dead"] == sae.n_latents
    m = atlas.meta["metrics"]  # a random SAE: better than zeroing its positions, not necessarily
    assert 0 < m["ce_recovered_sae_positions"] <= 1.01  # than zeroing every position (SAELens's)
    assert math.isfinite(m["ce_recovered"]) and m["ce_recovered"] <= 1.01
    assert "SAELens" in m["ce_recovered_conventions"]["ce_recovered"]


def test_logit_effects_are_the_decoder_through_the_unembedding(small_atlas, smollm):
    atlas = Atlas(small_atlas["path"])
    sae = SAE.load(small_atlas["sae"])
    w_u, scale = unembedding(smollm.model)
    assert scale is not None  # SmolLM2's final RMSNorm
    for f in (0, 7, 500):
        logits = (sae.W_dec[f].detach() * scale) @ w_u.T
        page = atlas.page(f)
        assert [i for i, _ in page.logits.pos] == logits.topk(10).indices.tolist()
        assert [i for i, _ in page.logits.neg] == (-logits).topk(10).indices.tolist()
        assert page.logits.pos[0][1] == pytest.approx(float(logits.max()), abs=1e-3)


def test_killed_build_resumes_to_the_same_atlas(small_atlas, smollm, monkeypatch, tmp_path):
    cfg = small_atlas["cfg"].model_copy(update={"eval_tokens": 0, "checkpoint_every": 1e-6})
    whole = build_atlas(small_atlas["sae"], cfg, tmp_path / "whole.atlas", lm=smollm).path
    real_update, calls = atlas_mod._Pass.update, []

    def crash_on_fourth(self, *args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_update(self, *args)

    monkeypatch.setattr(atlas_mod._Pass, "update", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        build_atlas(small_atlas["sae"], cfg, tmp_path / "resumed.atlas", lm=smollm)
    assert not (tmp_path / "resumed.atlas").exists()
    assert (tmp_path / "resumed.atlas.partial" / "state.pt").is_file()
    monkeypatch.setattr(atlas_mod._Pass, "update", real_update)
    resumed = build_atlas(small_atlas["sae"], cfg, tmp_path / "resumed.atlas", lm=smollm)
    assert resumed.tokens == Atlas(whole).meta["tokens"]
    assert not (tmp_path / "resumed.atlas.partial").exists()
    a, b = Atlas(whole)._db(), Atlas(resumed.path)._db()
    for table in ("features", "pages", "token_features"):
        q = f"SELECT * FROM {table} ORDER BY 1, 2"
        assert a.execute(q).fetchall() == b.execute(q).fetchall(), table


def test_auto_label():
    ex = [([" x", " def"], 1), ([" y", " def"], 1), (["(", " def"], 1), ([" a", " class"], 1)]
    assert auto_label(ex) == ("“def”", 0.75)
    assert auto_label([([" the", " cat"], 1), ([" the", " cat"], 1)]) == ("“the cat”", 1.0)
    label, conf = auto_label([(["a"], 0), (["b"], 0), (["c"], 0), (["d"], 0)])
    assert label.startswith("mixed:") and conf == 0.25
    assert auto_label([]) == ("dead", 0.0)


class FakeLLM(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint: explains a feature by its commonest marked token
    and, asked to detect, answers 1 for texts containing that token."""

    requests: ClassVar[list[dict]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        FakeLLM.requests.append({"path": self.path, "auth": self.headers.get("authorization"), **body})
        user = body["messages"][-1]["content"]
        if user.startswith("Examples:"):
            import re

            marked = re.findall(r"<<(.+?)>>", user)
            word = max(set(marked), key=marked.count).strip() if marked else "nothing"
            reply = f"the token {word}"
        else:
            word = user.split("\n")[0].removeprefix("Explanation: the token ")
            texts = [line for line in user.split("\n")[3:] if line.strip()]
            reply = json.dumps([1 if word in t else 0 for t in texts])
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_explainer_against_a_local_openai_compatible_server(small_atlas, smollm, tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), FakeLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SAELAB_EXPLAINER_KEY", "test-key")
    try:
        cfg = small_atlas["cfg"].model_copy(
            update={
                "eval_tokens": 0,
                "explainer_url": f"http://127.0.0.1:{server.server_port}/v1",
                "explainer_model": "fake-1",
                "explain_features": 3,
                # a small sample shown, so even rare features keep held-out firings to score on
                "top_examples": 4,
                "bands": 2,
                "band_examples": 1,
            }
        )
        path = build_atlas(small_atlas["sae"], cfg, tmp_path / "explained.atlas", lm=smollm).path
    finally:
        server.shutdown()
    atlas = Atlas(path)
    explained = [r for r in atlas.list_features("id", False, limit=2000)[1] if r["explanation"]]
    scored = [r for r in explained if r["explanation_score"] is not None]
    assert len(explained) == 3 and len(scored) >= 2
    # one explanation per feature, one detection test per feature it could find negatives for
    assert len(FakeLLM.requests) == 3 + len(scored)
    assert all(
        r["path"] == "/v1/chat/completions" and r["model"] == "fake-1" and r["auth"] == "Bearer test-key"
        for r in FakeLLM.requests
    )
    for row in explained:
        assert row["explanation"].startswith("the token ")
    assert all(0.0 <= r["explanation_score"] <= 1.0 for r in scored)
    # a keyword detector built from the top examples beats chance on held-out examples
    assert np.mean([r["explanation_score"] for r in scored]) > 0.5
    assert atlas.page(explained[0]["id"]).explanation == explained[0]["explanation"]


def test_static_export_holds_every_feature(small_atlas, tmp_path):
    out = export_html(small_atlas["path"], tmp_path / "site", progress=False)
    n = Atlas(small_atlas["path"]).n_features
    assert len(list((out / "data" / "f").glob("*.js"))) == n
    assert '<script src="data/meta.js"></script>' in (out / "index.html").read_text()
    page = (out / "data" / "f" / "3.js").read_text()
    assert page.startswith("SAELAB_PAGE(3, {") and "<" not in page  # no markup can close a script


def test_atlas_cli_errors(tmp_path, small_atlas):
    no_model = tmp_path / "sae"
    sae = SAE.load(small_atlas["sae"])
    sae.cfg = sae.cfg.model_copy(update={"model_name": None})
    sae.save(no_model)
    assert_one_line_error(
        run_cli("atlas", str(no_model), "--out", str(tmp_path / "x.atlas")), "names no model", "--model"
    )
    assert_one_line_error(run_cli("serve", str(tmp_path / "missing.atlas")), "missing.atlas", "saelab atlas")
    bad = tmp_path / "bad.atlas"
    bad.write_text("not a database")
    assert_one_line_error(
        run_cli("atlas", "export-html", str(bad), "--out", str(tmp_path / "site")),
        "bad.atlas",
        "not a saelab atlas",
    )
