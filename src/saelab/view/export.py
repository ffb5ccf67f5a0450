"""The atlas as a static site: the viewer's files plus its data as JavaScript files.

The site needs no server: open ``index.html`` from disk or host the folder anywhere. Data
comes as ``<script>`` files (``data/meta.js``, which also carries the page schema,
``data/list.js``, ``data/tokens.js`` and one ``data/f/<id>.js`` per feature) rather than
JSON fetched by the page, because browsers refuse ``fetch`` on ``file://`` pages.
Everything but the live text box works.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from saelab.analyse.atlasdb import Atlas
from saelab.analyse.page import schema
from saelab.view.server import STATIC

LIST_KEYS = ("id", "density", "max_act", "label", "label_confidence", "explanation", "explanation_score")


def _js(obj: object) -> str:
    # JSON is JavaScript; escape "<" so no text can close a script element if inlined.
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c")


def export_html(atlas_path: str | Path, out: str | Path, progress: bool = True) -> Path:
    """Write the static site of the atlas at ``atlas_path`` into the folder ``out``."""
    atlas = Atlas(atlas_path)
    out = Path(out)
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data" / "f").mkdir(parents=True)
    shutil.copytree(STATIC, tmp / "static")
    index = (STATIC / "index.html").read_text().replace("<!--DATA-->", '<script src="data/meta.js"></script>')
    (tmp / "index.html").write_text(index)

    meta = {
        **atlas.meta,
        "live": False,
        "live_error": "a static export has no live model; `saelab serve ATLAS` has the text box",
        "schema": schema(),
    }
    (tmp / "data" / "meta.js").write_text(f"window.SAELAB_STATIC = {_js(meta)};\n")
    _, items = atlas.list_features("id", False, limit=max(atlas.n_features, 1))
    rows = [[it[k] for k in LIST_KEYS] for it in items]
    (tmp / "data" / "list.js").write_text(f"SAELAB_LIST({_js(LIST_KEYS)}, {_js(rows)});\n")
    tokens: dict[str, list[list]] = {}
    db = atlas._db()
    for text, fid, act in db.execute(
        "SELECT lower(trim(v.text)), tf.feature, MAX(tf.activation) AS a FROM token_features tf "
        "JOIN vocab v ON v.id = tf.token_id GROUP BY lower(trim(v.text)), tf.feature ORDER BY a DESC"
    ):
        hits = tokens.setdefault(text, [])
        if len(hits) < 50 and text:
            hits.append([fid, round(act, 3)])
    (tmp / "data" / "tokens.js").write_text(f"SAELAB_TOKENS({_js(tokens)});\n")
    rows_iter = db.execute("SELECT feature, json FROM pages ORDER BY feature")
    for fid, blob in tqdm(
        rows_iter,
        total=atlas.n_features,
        desc="export-html",
        unit="feature",
        dynamic_ncols=True,
        disable=not progress,
    ):
        page = gzip.decompress(blob).decode().replace("<", "\\u003c")
        (tmp / "data" / "f" / f"{fid}.js").write_text(f"SAELAB_PAGE({fid}, {page});\n")
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out
