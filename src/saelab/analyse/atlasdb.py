"""The atlas file: one SQLite database per SAE, written once, read by the viewer.

Schema (``format_version`` 1)::

    meta(key TEXT PRIMARY KEY, value TEXT)          -- JSON values, see below
    vocab(id INTEGER PRIMARY KEY, text TEXT)         -- the model's tokens as text
    features(id INTEGER PRIMARY KEY,
             density REAL, count INTEGER,            -- firing frequency, firings
             max_act REAL, mean_act REAL,            -- over firings
             label TEXT, label_confidence REAL,      -- automatic label from the top examples
             explanation TEXT, explanation_score REAL)  -- from the explainer, if one ran
    token_features(token_id INTEGER, feature INTEGER, activation REAL)
                                                     -- tokens a feature fires on in its top examples
    pages(feature INTEGER PRIMARY KEY, json BLOB)    -- everything else about a feature: gzip'd JSON
    relatives(feature INTEGER, dictionary TEXT, other INTEGER, cosine REAL, label TEXT)
                                                     -- optional (added by add_relatives): the
                                                     -- closest features in other dictionaries

A page (``Atlas.page(id)``, gzip'd JSON in ``pages``) is a
:class:`~saelab.analyse.page.FeaturePage` and ``meta`` holds the fields of
:class:`~saelab.analyse.page.AtlasMeta` (one JSON value per key): the types, their fields
and what each means are defined there, once, for the builder, this reader, the study and
the viewer (which gets their JSON schema from ``/api/schema``).

Indexes serve the viewer's queries: features by density, max activation and label;
token_features by token then activation.

The file is built beside its target and renamed into place, so an atlas is either the
old one or the complete new one.
"""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from saelab.analyse.page import AtlasMeta, FeaturePage
from saelab.config_base import validation_message
from saelab.errors import InputError

ATLAS_FORMAT_VERSION = 1

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE vocab(id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE features(
    id INTEGER PRIMARY KEY, density REAL NOT NULL, count INTEGER NOT NULL,
    max_act REAL NOT NULL, mean_act REAL NOT NULL,
    label TEXT NOT NULL, label_confidence REAL NOT NULL,
    explanation TEXT, explanation_score REAL);
CREATE TABLE token_features(token_id INTEGER NOT NULL, feature INTEGER NOT NULL, activation REAL NOT NULL);
CREATE TABLE pages(feature INTEGER PRIMARY KEY, json BLOB NOT NULL);
"""

INDEXES = """
CREATE INDEX features_density ON features(density);
CREATE INDEX features_max_act ON features(max_act);
CREATE INDEX features_label ON features(label COLLATE NOCASE);
CREATE INDEX token_features_token ON token_features(token_id, activation DESC);
"""

SORTS = {
    "id": "id",
    "density": "density",
    "max_act": "max_act",
    "label": "label COLLATE NOCASE",
    "confidence": "label_confidence",
    "score": "explanation_score",
}


def pack_page(page: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(page, separators=(",", ":")).encode(), compresslevel=6, mtime=0)


class AtlasWriter:
    """Fills a new atlas in ``<path>.building`` and renames it to ``path`` on :meth:`close`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".building")
        self.tmp.unlink(missing_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.tmp)
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + SCHEMA)

    def meta(self, values: dict[str, Any]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()]
        )

    def vocab(self, texts: Sequence[str]) -> None:
        self.db.executemany("INSERT INTO vocab VALUES (?, ?)", enumerate(texts))

    def features(self, rows: Iterable[tuple]) -> None:
        self.db.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def token_features(self, rows: Iterable[tuple[int, int, float]]) -> None:
        self.db.executemany("INSERT INTO token_features VALUES (?, ?, ?)", rows)

    def pages(self, rows: Iterable[tuple[int, bytes]]) -> None:
        self.db.executemany("INSERT INTO pages VALUES (?, ?)", rows)

    def close(self) -> Path:
        self.db.executescript(INDEXES)
        self.db.commit()
        self.db.execute("VACUUM")
        self.db.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.db.close()
        self.tmp.unlink(missing_ok=True)


RELATIVES_SCHEMA = """
CREATE TABLE relatives(feature INTEGER NOT NULL, dictionary TEXT NOT NULL, other INTEGER NOT NULL,
                       cosine REAL NOT NULL, label TEXT);
CREATE INDEX relatives_feature ON relatives(feature);
"""


def add_relatives(path: str | Path, rows: dict[int, list[dict[str, Any]]],
                  dictionaries: dict[str, str | None]) -> Path:
    """Record each feature's closest features in other dictionaries (``rows``: {feature:
    [{dictionary, feature, cosine}]}), labelled from those dictionaries' atlases where
    ``dictionaries`` names one. Rewrites the atlas beside itself and renames it into place;
    any relatives recorded before are replaced."""
    path = Path(path)
    labels: dict[str, dict[int, str]] = {}
    for name, other in dictionaries.items():
        if other is not None and Path(other).is_file():
            a = Atlas(other)
            labels[name] = a.labels(list(range(a.n_features)))
    tmp = path.with_name(path.name + ".relatives")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(path)
    dst = sqlite3.connect(tmp)
    try:
        src.backup(dst)
        dst.executescript("DROP TABLE IF EXISTS relatives;" + RELATIVES_SCHEMA)
        dst.executemany("INSERT INTO relatives VALUES (?, ?, ?, ?, ?)", [
            (f, r["dictionary"], r["feature"], r["cosine"], labels.get(r["dictionary"], {}).get(r["feature"]))
            for f, rs in rows.items() for r in rs])
        dst.execute("INSERT OR REPLACE INTO meta VALUES ('relatives', ?)", (json.dumps(dictionaries),))
        dst.commit()
    finally:
        dst.close()
        src.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class Atlas:
    """Read-only access to an atlas file, safe to share between threads (one connection each)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(
                f"{self.path}: no atlas file here; build one with `saelab atlas SAE_DIR --out {self.path}`"
            )
        self._local = threading.local()
        try:
            meta = dict(self._db().execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise InputError(f"{self.path}: not a saelab atlas ({e})") from None
        self.meta: dict[str, Any] = {k: json.loads(v) for k, v in meta.items()}
        version = self.meta.get("format_version")
        if version != ATLAS_FORMAT_VERSION:
            raise InputError(
                f"{self.path}: atlas format version {version!r}, this saelab reads "
                f"{ATLAS_FORMAT_VERSION}; rebuild it with `saelab atlas`"
            )
        try:
            AtlasMeta.model_validate(self.meta)
        except ValidationError as e:
            raise InputError(f"{self.path}: its meta does not match this saelab's atlas "
                             f"({validation_message(e)}); rebuild it with `saelab atlas`") from None
        self.n_features = int(self._db().execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def check(self) -> None:
        """Refuse a damaged file: SQLite's quick_check, then every page read back and
        decompressed (its gzip CRC checked), naming the first bad pages."""
        import zlib

        try:
            problems = [r[0] for r in self._db().execute("PRAGMA quick_check").fetchall() if r[0] != "ok"]
            bad = []
            if not problems:
                for fid, blob in self._db().execute("SELECT feature, json FROM pages"):
                    try:
                        gzip.decompress(bytes(blob))
                    except (OSError, EOFError, zlib.error):
                        bad.append(int(fid))
        except sqlite3.DatabaseError as e:
            problems, bad = [str(e)], []
        if problems or bad:
            what = "; ".join(problems[:3]) if problems else \
                f"{len(bad):,} of {self.n_features:,} feature pages do not read back (features " \
                f"{', '.join(map(str, bad[:8]))}{', ...' if len(bad) > 8 else ''})"
            raise InputError(f"{self.path} is damaged: {what}; rebuild it with `saelab atlas`")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # immutable=1: the file never changes under us, so SQLite takes no locks.
            uri = f"file:{self.path.resolve()}?mode=ro&immutable=1"
            db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self._local.db = db
        return db

    def page_gz(self, feature: int) -> bytes | None:
        row = self._db().execute("SELECT json FROM pages WHERE feature = ?", (feature,)).fetchone()
        return None if row is None else bytes(row[0])

    def page(self, feature: int) -> FeaturePage | None:
        raw = self.page_gz(feature)
        return None if raw is None else FeaturePage.model_validate_json(gzip.decompress(raw))

    def list_features(
        self,
        sort: str = "density",
        descending: bool = True,
        label: str | None = None,
        min_density: float | None = None,
        max_density: float | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> tuple[int, list[dict[str, Any]]]:
        """(total matching, one page of rows) for the feature list."""
        if sort not in SORTS:
            raise InputError(f"sort must be one of {', '.join(SORTS)}, not {sort!r}")
        where, args = [], []
        if label:
            where.append("(label LIKE ? ESCAPE '\\' OR explanation LIKE ? ESCAPE '\\')")
            pattern = "%" + label.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            args += [pattern, pattern]
        if min_density is not None:
            where.append("density >= ?")
            args.append(min_density)
        if max_density is not None:
            where.append("density <= ?")
            args.append(max_density)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        db = self._db()
        total = int(db.execute(f"SELECT COUNT(*) FROM features {clause}", args).fetchone()[0])
        order = f"{SORTS[sort]} {'DESC' if descending else 'ASC'}, id ASC"
        rows = db.execute(
            f"SELECT id, density, max_act, label, label_confidence, explanation, explanation_score "
            f"FROM features {clause} ORDER BY {order} LIMIT ? OFFSET ?",
            [*args, limit, offset],
        ).fetchall()
        keys = ("id", "density", "max_act", "label", "label_confidence", "explanation", "explanation_score")
        return total, [dict(zip(keys, r, strict=True)) for r in rows]

    def features_with_token(self, text: str, limit: int = 50) -> list[dict[str, Any]]:
        """Features whose top examples fire on a token whose text is ``text`` (case and
        surrounding spaces ignored), strongest first."""
        needle = text.strip().lower()
        if not needle:
            return []
        rows = (
            self._db()
            .execute(
                "SELECT tf.feature, MAX(tf.activation) AS a, v.text, f.label FROM vocab v "
                "JOIN token_features tf ON tf.token_id = v.id JOIN features f ON f.id = tf.feature "
                "WHERE lower(trim(v.text)) = ? GROUP BY tf.feature ORDER BY a DESC LIMIT ?",
                (needle, limit),
            )
            .fetchall()
        )
        return [{"id": r[0], "activation": r[1], "token": r[2], "label": r[3]} for r in rows]

    def labels(self, ids: Sequence[int]) -> dict[int, str]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        return dict(
            self._db().execute(f"SELECT id, label FROM features WHERE id IN ({marks})", list(ids)).fetchall()
        )

    def relatives(self, feature: int) -> list[dict[str, Any]]:
        """The closest features of other dictionaries (empty if none were recorded)."""
        if "relatives" not in self.meta:
            return []
        rows = self._db().execute(
            "SELECT dictionary, other, cosine, label FROM relatives WHERE feature = ? "
            "ORDER BY dictionary, cosine DESC", (feature,)).fetchall()
        return [{"dictionary": d, "feature": o, "cosine": c, "label": lab} for d, o, c, lab in rows]

    def vocab(self) -> list[str]:
        return [t for (t,) in self._db().execute("SELECT text FROM vocab ORDER BY id")]
