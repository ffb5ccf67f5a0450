"""The atlas viewer: its API (FastAPI TestClient), and the pages in a real headless Chromium
(Debian's chromium driven by Playwright): list, feature page, search, live text box, a
screenshot with content, and a corpus of HTML/JS injections that renders as text."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import XSS_IMG, XSS_SCRIPT
from fastapi.testclient import TestClient
from helpers import chromium, serving

from saelab.analyse.atlasdb import Atlas
from saelab.view.export import export_html
from saelab.view.server import create_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(small_atlas):
    app = create_app(small_atlas["path"], live=True, device="cpu")
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def test_api_list_sort_filter_and_page(client, small_atlas):
    atlas = Atlas(small_atlas["path"])
    r = client.get("/api/features", params={"sort": "density", "order": "desc", "limit": 20})
    assert r.status_code == 200
    body = r.json()
    assert body["total"] == atlas.n_features == 1152
    dens = [f["density"] for f in body["items"]]
    assert len(dens) == 20 and dens == sorted(dens, reverse=True)
    page2 = client.get("/api/features", params={"sort": "density", "offset": 20, "limit": 20}).json()
    assert page2["items"][0]["density"] <= dens[-1] and page2["items"][0]["id"] not in {
        f["id"] for f in body["items"]
    }
    asc = client.get("/api/features", params={"sort": "max_act", "order": "asc"}).json()["items"]
    assert [f["max_act"] for f in asc] == sorted(f["max_act"] for f in asc)
    label = body["items"][0]["label"]
    hits = client.get("/api/features", params={"q": label.strip("“”")}).json()
    assert hits["total"] >= 1 and all(label.strip("“”").lower() in f["label"].lower() for f in hits["items"])
    few = client.get("/api/features", params={"min_density": dens[4]}).json()
    assert few["total"] >= 5 and all(f["density"] >= dens[4] for f in few["items"])
    assert client.get("/api/features", params={"sort": "id; DROP TABLE features"}).status_code == 422
    assert client.get("/api/features", params={"q": "'; DROP TABLE features; --"}).json()["total"] == 0


def test_api_feature_search_and_errors(client, small_atlas):
    fid = client.get("/api/features", params={"limit": 1}).json()["items"][0]["id"]  # densest
    f = client.get(f"/api/feature/{fid}")
    assert f.status_code == 200 and f.json()["id"] == fid and "logits" in f.json()
    missing = client.get("/api/feature/999999")
    assert missing.status_code == 404 and "0 to 1151" in missing.json()["detail"]
    s = client.get("/api/search", params={"q": str(fid)}).json()
    assert s["by_id"]["id"] == fid
    page = f.json()
    peak_token = page["vocab"][str(page["top"][0]["t"][page["top"][0]["peak"]])]
    by_token = client.get("/api/search", params={"q": peak_token}).json()["by_token"]
    assert fid in [h["id"] for h in by_token]
    # no file outside the atlas can be read through the server
    for path in ("/static/../../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd", "/static/../server.py"):
        r = client.get(path)
        assert r.status_code == 404 and "root:" not in r.text
    r = client.get("/")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"


def test_api_live_text(client):
    r = client.post("/api/live", json={"text": "def main():\n    return 0"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert "".join(out["tokens"]) == "def main():\n    return 0"
    assert all(len(fs) == 8 for fs in out["features"])  # TopK k = 16: every token has features
    assert out["top"] and all(str(i) in out["labels"] for i, _ in out["top"])
    too_long = client.post("/api/live", json={"text": "x" * 2001})
    assert too_long.status_code == 413 and "2000" in too_long.json()["detail"]
    capped = client.post("/api/live", json={"text": "a b " * 400}).json()
    assert capped["truncated"] and len(capped["tokens"]) == 256


def test_api_steer_and_attribute(client):
    prompt = "def main():\n    return"

    def steer(**kw):
        return client.post("/api/steer", json={"feature": 3, "prompt": prompt, "max_new_tokens": 8, **kw})

    same = steer(mode="scale", value=1.0).json()  # an edit that changes nothing
    assert same["clean"] and same["steered"] == same["clean"]
    pushed = steer(mode="add", value=200.0).json()
    assert pushed["clean"] == same["clean"] and pushed["steered"] != pushed["clean"]
    assert "3" in pushed["labels"] and pushed["seconds"] > 0
    missing = steer(feature=99999)
    assert missing.status_code == 404 and "0 to 1151" in missing.json()["detail"]
    assert steer(max_new_tokens=1000).status_code == 422
    assert steer(mode="explode").status_code == 422
    assert steer(prompt="x" * 2001).status_code == 413

    text = "import os\nimport sys\nimport"
    a = client.post("/api/attribute", json={"text": text}).json()
    assert "".join(a["tokens"]) == text and len(a["features"]) == len(a["tokens"])
    assert a["target"] and a["top"] and all(str(i) in a["labels"] for i, _ in a["top"])
    chosen = client.post("/api/attribute", json={"text": text, "target": " json"}).json()
    assert chosen["target"] == " json" and chosen["logit"] != a["logit"]


# ---------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def server(small_atlas):
    with serving(create_app(small_atlas["path"], device="cpu")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser):
    pg = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
    pg.errors = errors
    yield pg
    assert not errors, errors
    pg.close()


def _not_blank(png: Path) -> None:
    import numpy as np
    from matplotlib.image import imread

    img = imread(png)[..., :3]
    inked = (img.min(axis=-1) < 0.85).mean()
    colours = len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert inked > 0.03 and colours > 50, (inked, colours)


def test_browser_list_feature_and_keyboard(server, page, tmp_path):
    page.goto(server + "/")
    page.wait_for_selector("#feature-table tbody tr")
    rows = page.locator("#feature-table tbody tr")
    assert rows.count() == 50
    assert "1,152 features" in page.inner_text("main")
    page.click("th:has-text('Max act.')")  # sort by max activation, descending
    page.wait_for_function("location.hash.includes('sort=max_act')")
    page.wait_for_selector("#feature-table tbody tr")
    first = page.locator("#feature-table tbody tr").first.get_attribute("data-id")
    page.keyboard.press("Enter")  # open the selected (first) row
    page.wait_for_selector("#top-examples .example")
    assert page.url.endswith(f"#/f/{first}")
    assert page.locator("#top-examples .example").count() >= 1
    assert page.locator("#top-examples .tok.peak").count() >= 1
    assert page.locator("#bands .example").count() >= 1
    assert page.locator("#logits tr").count() == 20  # 10 raised, 10 lowered tokens
    assert page.locator("svg.hist rect").count() >= 1
    title = page.locator(".tok.peak").first.get_attribute("title")
    assert "·" in title  # hover shows the activation
    page.keyboard.press("j")
    page.wait_for_function(f"location.hash === '#/f/{int(first) + 1}'")
    page.wait_for_selector("#feature-label")
    page.goto(server + f"/feature/{first}")  # linkable URL per feature
    page.wait_for_selector("#top-examples .example")
    shot = tmp_path / "feature.png"
    page.screenshot(path=str(shot), full_page=True)
    _not_blank(shot)


def test_browser_search_about_and_live(server, page):
    page.goto(server + "/")
    page.wait_for_selector("#feature-table")
    page.keyboard.press("/")
    page.keyboard.type("7")
    page.keyboard.press("Enter")
    page.wait_for_function("location.hash === '#/search/7'")
    page.wait_for_selector("main h2")
    assert page.locator("main a[href='#/f/7']").count() >= 1
    page.goto(server + "/#/about")
    page.wait_for_selector("#metrics")
    text = page.inner_text("main")
    assert "smollm2-135m" in text and "blocks.2.hook_resid_post" in text and "CE loss recovered" in text
    page.goto(server + "/#/live")
    page.fill("#live-text", "import os\nprint(os.getcwd())")
    page.click("#live-run")
    page.wait_for_selector("#live-tokens .tok")
    assert page.locator("#live-tokens .tok").count() >= 6
    page.locator("#live-tokens .tok").nth(2).click()
    page.wait_for_selector("main .cols h2:has-text('Token')")
    assert page.locator("#live-top li").count() >= 1
    # attribution of the next token, per token of the text
    page.fill("#attr-target", " (")
    page.click("#attr-run")
    page.wait_for_selector("#attr-tokens li")
    assert page.locator("#attr-tokens > li").count() == page.locator("#live-tokens .tok").count()
    assert page.text_content("#attr-target-token") == " ("
    assert page.locator("#attr-top li a").count() >= 1


def test_browser_steering_box(server, page):
    page.goto(server + "/#/f/3")
    page.wait_for_selector("#steer-run")
    page.fill("#steer-prompt", "def main():\n    return")
    page.select_option("#steer-mode", "add")
    page.fill("#steer-value", "200")
    page.fill("#steer-tokens", "8")
    page.click("#steer-run")
    page.wait_for_selector("#steer-out .continuation.steered")
    clean = page.inner_text("#steer-out .continuation.clean")
    steered = page.inner_text("#steer-out .continuation.steered")
    assert clean.startswith("def main():") and steered.startswith("def main():") and clean != steered
    assert "#3 direction × 200 added" in page.inner_text("#steer-out")


def _xss_features(atlas_path: Path) -> list[int]:
    atlas = Atlas(atlas_path)
    ids = {h["id"] for tok in ("script", "img", "onerror") for h in atlas.features_with_token(tok)}
    assert ids, "the injection text should be among some feature's top examples"
    return sorted(ids)[:3]


def test_browser_renders_injected_markup_as_text(server, page, small_atlas):
    for fid in _xss_features(small_atlas["path"]):
        page.goto(server + f"/#/f/{fid}")
        page.wait_for_selector("#top-examples .example")
        text = page.inner_text("#top-examples")
        assert "script" in text or "img" in text or "onerror" in text
        assert page.evaluate("window.__xss") is None
        assert page.locator("main img, main script").count() == 0
    page.goto(server + "/#/live")
    page.fill("#live-text", XSS_SCRIPT + XSS_IMG)
    page.click("#live-run")
    page.wait_for_selector("#live-tokens .tok")
    assert page.inner_text("#live-tokens").replace("⏎", "\n") == XSS_SCRIPT + XSS_IMG
    assert page.evaluate("window.__xss") is None


def test_static_export_in_the_browser(small_atlas, page, tmp_path):
    site = export_html(small_atlas["path"], tmp_path / "site", progress=False)
    fid = _xss_features(small_atlas["path"])[0]
    page.goto((site / "index.html").as_uri() + f"#/f/{fid}")
    page.wait_for_selector("#top-examples .example")
    assert page.locator("#logits tr").count() == 20
    assert page.evaluate("window.__xss") is None
    page.goto((site / "index.html").as_uri() + "#/?sort=density")
    page.wait_for_selector("#feature-table tbody tr")
    assert page.locator("#feature-table tbody tr").count() == 50
    page.goto((site / "index.html").as_uri() + "#/live")
    page.wait_for_selector("main .error")
    assert "static export" in page.inner_text("main")
    shutil.rmtree(site)


def test_viewer_reads_only_fields_of_the_page_contract(client):
    """The schema served is the one FeaturePage defines, and every field app.js reads from a
    page (``f.<name>``) or an example (``e.<name>``) is one of it."""
    import re

    from saelab.analyse.page import Example, FeaturePage

    served = client.get("/api/schema").json()
    assert set(served["page"]["properties"]) == set(FeaturePage.model_fields)
    assert set(served["page"]["$defs"]["Example"]["properties"]) == set(Example.model_fields) == {
        "act", "peak", "t", "a"}
    js = (Path(__file__).parents[1] / "src/saelab/view/static/app.js").read_text()
    body = js[js.index("async function pageFeature"):js.index("async function pageSearch")]
    read = set(re.findall(r"\bf\.([a-z_]+)", body)) - {"map", "length", "slice"}
    assert read and read <= set(FeaturePage.model_fields), read - set(FeaturePage.model_fields)
    example = set(re.findall(r"\bex\.([a-z_]+)", js))
    assert example and example <= set(Example.model_fields), example


def test_browser_names_what_a_page_lacks(small_atlas, page, tmp_path):
    """A page without a field the contract requires is reported by name, not drawn broken."""
    import gzip
    import json
    import sqlite3

    bad = tmp_path / "bad.atlas"
    shutil.copy(small_atlas["path"], bad)
    db = sqlite3.connect(bad)
    (blob,) = db.execute("SELECT json FROM pages WHERE feature = 2").fetchone()
    p = json.loads(gzip.decompress(blob))
    del p["hist"]
    db.execute("UPDATE pages SET json = ? WHERE feature = 2", (gzip.compress(json.dumps(p).encode()),))
    db.commit()
    db.close()
    with serving(create_app(bad, live=False)) as url:
        page.goto(url + "/#/f/2")
        page.wait_for_selector("main .error")
        assert "feature 2's page lacks hist" in page.inner_text("main")
        page.goto(url + "/#/f/3")  # the others are drawn as ever
        page.wait_for_selector("#feature-label")
        assert "lacks" not in page.inner_text("main")
