"""The viewer never answers 500: each malformed or hostile request gets a 4xx JSON answer
with the security headers, over a real uvicorn server and raw HTTP (so the Host header,
declared body sizes and keep-alive are what a client sends); a damaged atlas or an SAE of
another width is refused at start."""

from __future__ import annotations

import http.client
import json
import shutil
import sqlite3

import pytest
import torch
from helpers import chromium, serving, write_corpus

from saelab.errors import SaelabError
from saelab.view.server import create_app

pytestmark = pytest.mark.slow
HOOK = "blocks.0.hook_mlp_out"
BIG = "9" * 25  # beyond int64


@pytest.fixture(scope="module")
def one_layer_atlas(tmp_path_factory):
    """An atlas of a random TopK SAE on the one-layer model (256 positions)."""
    from saelab.analyse.atlas import build_atlas
    from saelab.config import AtlasConfig
    from saelab.sae.base import create
    from saelab.sae.config import SAEConfig

    root = tmp_path_factory.mktemp("guard")
    corpus = write_corpus(root / "corpus", n_docs=16, words=60)
    for n, name in ((256, "sae"), (512, "wider")):
        sae = create(SAEConfig(architecture="topk", d_in=128, n_latents=n, k=8, hook_name=HOOK,
                               model_name="one-layer"))
        sae.init_weights(torch.Generator().manual_seed(0))
        sae.save(root / name)
    cfg = AtlasConfig(corpus=str(corpus), context_length=64, batch_size=4, heldout_fraction=0.5,
                      eval_tokens=128, progress=False)
    return build_atlas(root / "sae", cfg, root / "one.atlas").path, root


@pytest.fixture(scope="module")
def server(one_layer_atlas):
    with serving(create_app(one_layer_atlas[0], device="cpu")) as url:
        yield url


def _conn(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=60)


def _ask(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(raw) if raw else {}


MALFORMED = [
    ("GET", f"/api/feature/{BIG}", None, 422),
    ("GET", f"/api/feature/-{BIG}", None, 422),
    ("GET", f"/api/relatives/{2**63}", None, 422),
    ("GET", f"/feature/{BIG}", None, 422),
    ("GET", f"/api/features?offset={BIG}", None, 422),
    ("GET", "/api/features?min_density=nan", None, 422),
    ("GET", "/api/features?max_density=1e400", None, 422),
    ("GET", "/api/search?q=" + "%ED%A0%80", None, 200),  # invalid UTF-8 in a query: replaced, answered
    ("POST", "/api/live", b'{"text": "a\\ud800b"}', 422),
    ("POST", "/api/attribute", b'{"text": "a", "target": "\\udfff"}', 422),
    ("POST", "/api/live", b"NaN", 422),
    ("POST", "/api/live", b'{"text": "x"', 422),
    ("POST", "/api/steer", b'{"feature": 1, "prompt": "a", "value": NaN}', 422),
    ("POST", "/api/steer", b'{"feature": 1, "prompt": "a", "value": Infinity}', 422),
    ("POST", "/api/steer", b'{"feature": 1, "prompt": "a", "value": 1e400}', 422),
    ("POST", "/api/steer", f'{{"feature": {BIG}, "prompt": "a"}}'.encode(), 422),
    ("POST", "/api/steer", b'{"feature": 100000, "prompt": "a"}', 404),
    ("GET", "/api/docs", None, 404),
    ("GET", "/api/openapi.json", None, 404),
]


def test_each_malformed_request_gets_a_4xx_json_answer_on_one_kept_alive_connection(server):
    conn = _conn(server)
    status, _, _ = _ask(conn, "GET", "/api/meta")
    assert status == 200
    sock = conn.sock
    for method, path, body, want in MALFORMED:
        status, headers, answer = _ask(conn, method, path, body)
        assert status == want, (method, path, body, status, answer)
        assert headers["content-type"].startswith("application/json"), path
        assert "detail" in answer or want == 200, (path, answer)
        assert headers["x-content-type-options"] == "nosniff" and "content-security-policy" in headers
        assert headers["referrer-policy"] == "no-referrer"
    assert conn.sock is sock  # the same connection answered every one
    assert _ask(conn, "GET", "/api/feature/3")[0] == 200


def test_text_longer_than_the_models_context_is_cut_not_an_error(server):
    conn = _conn(server)
    long = " ".join(["word"] * 390)  # 1,949 characters, well past the one-layer model's 256 positions
    for path, body in (("/api/live", {"text": long}), ("/api/attribute", {"text": long}),
                       ("/api/steer", {"feature": 3, "prompt": long, "value": 5, "max_new_tokens": 64})):
        status, _, answer = _ask(conn, "POST", path, json.dumps(body).encode())
        assert status == 200, (path, answer)
    status, _, answer = _ask(conn, "POST", "/api/live", json.dumps({"text": long}).encode())
    assert answer["truncated"] and len(answer["tokens"]) <= 254


def test_bodies_are_limited_before_they_are_read(server):
    conn = _conn(server)
    conn.putrequest("POST", "/api/live")
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(100 * 2**20))  # declared, never sent
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "limited to" in json.loads(r.read())["detail"]
    assert r.getheader("content-security-policy")
    conn = _conn(server)
    conn.putrequest("POST", "/api/live")
    conn.putheader("content-type", "application/json")
    conn.putheader("transfer-encoding", "chunked")
    conn.endheaders()
    chunk = b"x" * 65536
    try:
        for _ in range(64):  # 4 MiB streamed with no declared length
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may stop reading once it has answered
    r = conn.getresponse()
    assert r.status == 413


def test_other_host_names_are_refused(server):
    conn = _conn(server)
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        status, headers, answer = _ask(conn, "GET", "/api/meta", headers={"Host": host})
        assert status == 421 and "answers only to" in answer["detail"], host
        assert "content-security-policy" in headers
    for host in ("127.0.0.1", "localhost:1234", "[::1]:8000"):
        assert _ask(_conn(server), "GET", "/api/meta", headers={"Host": host})[0] == 200, host


def test_a_damaged_atlas_or_an_sae_of_another_width_is_refused_at_start(one_layer_atlas, tmp_path):
    path, root = one_layer_atlas
    bad = tmp_path / "bad.atlas"
    shutil.copy(path, bad)
    db = sqlite3.connect(bad)
    (blob,) = db.execute("SELECT json FROM pages WHERE feature = 5").fetchone()
    db.close()
    raw = bytearray(bad.read_bytes())
    at = raw.find(bytes(blob[:64]))
    assert at > 0
    raw[at + 40] ^= 0xFF  # flip a byte inside feature 5's stored page
    bad.write_bytes(bytes(raw))
    with pytest.raises(SaelabError, match=r"bad\.atlas is damaged: 1 of 256 feature pages do not read back "
                                          r"\(features 5\); rebuild it"):
        create_app(bad, live=False)
    with pytest.raises(SaelabError, match=r"--sae .*wider has 512 latents .* describes 256 features"):
        create_app(path, live=True, sae_dir=str(root / "wider"))


def test_browser_shows_bidi_controls_and_a_bad_route_visibly(one_layer_atlas, tmp_path):
    path, _ = one_layer_atlas
    odd = tmp_path / "odd.atlas"
    shutil.copy(path, odd)
    db = sqlite3.connect(odd)
    db.execute("UPDATE features SET label = ? WHERE id = 7", ("left\u202eright",))
    db.commit()
    db.close()
    with serving(create_app(odd, live=False)) as url, chromium() as browser:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/#/search/%E0%A4%A")
        page.wait_for_selector("main .error", timeout=20_000)
        assert "not a valid link" in page.inner_text("main")
        page.goto(url + "/#/?q=left")
        page.wait_for_selector("#feature-table tbody tr", timeout=20_000)
        text = page.inner_text("#feature-table")
        assert "left\u27e6U+202E\u27e7right" in text and "\u202e" not in text
        assert not errors, errors
