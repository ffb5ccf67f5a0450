"""Binary probing tasks built from the text available offline, with exact labels.

Window tasks (an example is a passage of about ``chars`` characters, cut at whitespace from a
document; its label says where the passage comes from):

==================  ==========================================================================
``sotu_vs_moby``    State of the Union address (1) or Moby-Dick (0): two kinds of English prose
``sotu_vs_docs``    State of the Union (1) or the Python documentation's prose (0)
``docs_vs_code``    Python documentation prose (1) or Python source code from the stdlib (0)
``moby_vs_code``    Moby-Dick (1) or Python source code (0)
``sotu_era``        State of the Union from 1900 on (1) or before 1900 (0)
``sotu_party``      State of the Union by a Republican (1) or a Democrat (0), 1853 on
==================  ==========================================================================

Token tasks (an example is one model token of a Python stdlib file; the label comes from
Python's own :mod:`tokenize` on that file, for the Python token the model token's first
non-space character falls in):

==================  ==========================================================================
``py_string``       inside a string literal (f-strings included)
``py_comment``      inside a comment
``py_keyword``      a keyword (``def``, ``return``, ``if``, ...)
``py_number``       a number literal
``py_identifier``   a name that is not a keyword
==================  ==========================================================================

Each task is balanced: ``per_class`` examples of each label, drawn with a fixed seed, so a
task's chance accuracy is 0.5. A State of the Union file's name carries its year and party
(``1861_abraham_lincoln_r.txt``).
"""

from __future__ import annotations

import hashlib
import io
import json
import keyword
import random
import re
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from saelab.data.text import Corpus, Document
from saelab.io import atomic_write_json, cache_dir

WINDOW_TASKS = ("sotu_vs_moby", "sotu_vs_docs", "docs_vs_code", "moby_vs_code", "sotu_era", "sotu_party")
TOKEN_TASKS = ("py_string", "py_comment", "py_keyword", "py_number", "py_identifier")
TASKS = WINDOW_TASKS + TOKEN_TASKS
_SOTU = re.compile(r"(\d{4})_.*_([a-z])\.txt$")
TASKS_VERSION = 1  # bump when the way tasks are drawn changes: cached draws are then not reused


@dataclass
class WindowTask:
    """A passage-level task: the texts of each class."""

    name: str
    positives: list[str]
    negatives: list[str]
    level: Literal["window"] = "window"


def passages(docs: Iterator[Document], chars: int, limit: int, seed: int) -> list[str]:
    """Up to ``limit`` passages of about ``chars`` characters (cut at whitespace), drawn evenly
    from the documents with a fixed seed."""
    pieces: list[str] = []
    for doc in docs:
        text = doc.text.strip()
        for start in range(0, max(len(text) - chars // 2, 1), chars):
            piece = text[start:start + chars]
            cut = piece.rfind(" ")
            piece = piece[:cut] if cut > chars // 2 else piece
            if len(piece.strip()) > chars // 4:
                pieces.append(piece)
    rng = random.Random(seed)
    rng.shuffle(pieces)
    return pieces[:limit]


def _year(doc: Document) -> int:
    m = _SOTU.search(doc.id)
    return int(m.group(1)) if m else 0


def _party(doc: Document) -> str:
    m = _SOTU.search(doc.id)
    return m.group(2) if m else ""


def _cached(kind: str, key: dict[str, Any], build: Callable[[], Any]) -> Any:
    """``build()``'s JSON-able result, kept under the saelab cache by ``key`` (drawing the texts
    reads every corpus, about 8 s; a draw is fixed by its key, so it is made once)."""
    digest = hashlib.sha256(json.dumps({"v": TASKS_VERSION, **key}, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "probing" / f"{kind}-{digest}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        value = build()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, value)
        except OSError:
            pass  # a cache that cannot be written only costs time
        return value


def window_tasks(per_class: int, chars: int = 400, seed: int = 0,
                 names: tuple[str, ...] = WINDOW_TASKS) -> list[WindowTask]:
    """The window tasks named, each with ``per_class`` passages per label."""
    drawn = _cached("window", {"per_class": per_class, "chars": chars, "seed": seed, "names": list(names)},
                    lambda: [[t.name, t.positives, t.negatives]
                             for t in _draw_window_tasks(per_class, chars, seed, names)])
    return [WindowTask(name, pos, neg) for name, pos, neg in drawn]


def _draw_window_tasks(per_class: int, chars: int, seed: int, names: tuple[str, ...]) -> list[WindowTask]:
    def take(spec: str, keep=lambda d: True, salt: int = 0) -> list[str]:
        return passages((d for d in Corpus(spec).documents("all") if keep(d)), chars, per_class, seed + salt)

    sources = {
        "sotu_vs_moby": lambda: (take("sotu"), take("moby-dick")),
        "sotu_vs_docs": lambda: (take("sotu", salt=1), take("python-docs")),
        "docs_vs_code": lambda: (take("python-docs", salt=1), take("python-stdlib")),
        "moby_vs_code": lambda: (take("moby-dick", salt=1), take("python-stdlib", salt=1)),
        "sotu_era": lambda: (take("sotu", lambda d: _year(d) >= 1900, 2),
                             take("sotu", lambda d: 0 < _year(d) < 1900, 3)),
        "sotu_party": lambda: (take("sotu", lambda d: _year(d) >= 1853 and _party(d) == "r", 4),
                               take("sotu", lambda d: _year(d) >= 1853 and _party(d) == "d", 5)),
    }
    out = []
    for name in names:
        pos, neg = sources[name]()
        n = min(len(pos), len(neg))
        out.append(WindowTask(name, pos[:n], neg[:n]))
    return out


def python_categories(source: str) -> list[tuple[int, int, str]]:
    """(start, end, category) character spans of a Python source, from :mod:`tokenize`:
    string (an f-string whole), comment, keyword, number, identifier. Raises
    :class:`tokenize.TokenError` (or a SyntaxError) where tokenize cannot read the source."""
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def pos(rc: tuple[int, int]) -> int:
        return starts[rc[0] - 1] + rc[1] if rc[0] - 1 < len(starts) else len(source)

    spans: list[tuple[int, int, str]] = []
    depth, fstring_start = 0, 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        kind = tokenize.tok_name[tok.type]
        if kind == "FSTRING_START":
            fstring_start = pos(tok.start) if depth == 0 else fstring_start
            depth += 1
        elif kind == "FSTRING_END":
            depth -= 1
            if depth == 0:
                spans.append((fstring_start, pos(tok.end), "string"))
        elif depth == 0 and kind in ("STRING", "COMMENT", "NUMBER", "NAME"):
            cat = {"STRING": "string", "COMMENT": "comment", "NUMBER": "number"}.get(kind)
            cat = cat or ("keyword" if keyword.iskeyword(tok.string) else "identifier")
            spans.append((pos(tok.start), pos(tok.end), cat))
    return spans


TOKEN_CATEGORY = {"py_string": "string", "py_comment": "comment", "py_keyword": "keyword",
                  "py_number": "number", "py_identifier": "identifier"}


def code_texts(n: int, chars: int = 400, seed: int = 0) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """Up to ``n`` passages of Python stdlib source, each whole top-level statements (cut before
    a line that starts at column 0) that tokenize reads without error, with their spans."""
    drawn = _cached("code", {"n": n, "chars": chars, "seed": seed}, lambda: _draw_code_texts(n, chars, seed))
    return [(text, [(a, b, c) for a, b, c in spans]) for text, spans in drawn]


def _draw_code_texts(n: int, chars: int, seed: int) -> list[tuple[str, list[tuple[int, int, str]]]]:
    chunks: list[str] = []
    for doc in Corpus("python-stdlib").documents("all"):
        lines, size = [], 0
        for line in doc.text.splitlines(keepends=True):
            if size >= chars and line[:1] not in ("", " ", "\t", "\n", "#", ")", "]", "}"):
                chunks.append("".join(lines))
                lines, size = [], 0
            lines.append(line)
            size += len(line)
        if size >= chars // 2:
            chunks.append("".join(lines))
    random.Random(seed).shuffle(chunks)
    out = []
    for chunk in chunks:
        try:
            out.append((chunk, python_categories(chunk)))
        except (tokenize.TokenError, SyntaxError):
            continue
        if len(out) == n:
            break
    return out
