"""Corpora: every input format, named corpora, splits, packing into windows, bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_corpus

from saelab.data.text import Corpus, token_batches, windows
from saelab.errors import InputError


def texts(corpus: Corpus, split="all") -> list[str]:
    return [d.text for d in corpus.documents(split)]


def test_formats_give_the_same_documents(tmp_path):
    docs = [f"document number {i} says hello" for i in range(30)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(d)
    for spec in ("a.jsonl", "a.parquet", "saved", "txt"):
        assert texts(Corpus(str(tmp_path / spec))) == docs, spec


def test_split_is_by_document_and_stable(tmp_path):
    corpus = Corpus(str(write_corpus(tmp_path / "c", n_docs=200)), heldout_fraction=0.2)
    train, held = texts(corpus, "train"), texts(corpus, "heldout")
    assert len(train) + len(held) == 200
    assert 20 <= len(held) <= 60
    assert not set(train) & set(held)
    assert held == texts(corpus, "heldout")


def test_named_corpora_are_present():
    docs = Corpus("python-stdlib").documents()
    first = next(docs)
    assert first.id.startswith("python-stdlib/") and first.text
    both = Corpus("python-docs+python-stdlib")
    ids = [d.id for _, d in zip(range(4), both.documents(), strict=False)]
    assert [i.split("/")[0] for i in ids] == ["python-docs", "python-stdlib"] * 2  # interleaved


def test_windows_start_with_bos_and_mask_specials(tmp_path, minilm):
    corpus = Corpus(str(write_corpus(tmp_path / "c", n_docs=10)))
    fmt = minilm.window_format()
    ws = list(windows(corpus, minilm.tokenizer, 32, fmt))
    assert all(w[0] == fmt.bos_id for w, _ in ws)
    assert all(n == 32 and w[-1] == fmt.end_id for w, n in ws[:-1])
    batches = list(token_batches(corpus, minilm.tokenizer, 32, 4, fmt))
    total_real = sum(n for _, n in ws)
    assert sum(int(b.attention_mask.sum()) for b in batches) == total_real
    # content = real tokens minus one CLS and one SEP per window
    assert sum(b.n_content for b in batches) == total_real - 2 * len(ws)
    assert not batches[0].content_mask[:, 0].any()
    keep = list(token_batches(corpus, minilm.tokenizer, 32, 4, fmt, keep_special=True))
    assert sum(b.n_content for b in keep) == total_real
    # skipping windows resumes the same stream
    later = list(token_batches(corpus, minilm.tokenizer, 32, 4, fmt, skip_windows=4))
    assert (later[0].input_ids == batches[1].input_ids).all()


def test_bad_corpora_are_named(tmp_path):
    with pytest.raises(InputError, match="no such file or folder, and not a named corpus"):
        Corpus(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no files"):
        list(Corpus(str(tmp_path / "empty")).documents())
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(InputError, match="the file is empty"):
        list(Corpus(str(tmp_path / "blank.txt")).documents())
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match=r"bin\.txt: not UTF-8 text"):
        list(Corpus(str(tmp_path / "bin.txt")).documents())
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: no string field 'text'"):
        list(Corpus(str(tmp_path / "bad.jsonl")).documents())
    (tmp_path / "spaces.txt").write_text("   \n\n")
    with pytest.raises(InputError, match="holds no text documents"):
        list(Corpus(str(tmp_path / "spaces.txt")).documents())


def test_npm_corpora_state_of_the_union_and_moby_dick():
    sotu = list(Corpus("sotu").documents("all"))
    assert len(sotu) == 233 and sotu[0].id == "sotu/data/1790_george_washington_n.txt"
    assert sotu[-1].id.startswith("sotu/data/2021_") and sum(len(d.text) for d in sotu) > 10_000_000
    moby = list(Corpus("moby-dick").documents("all"))
    assert len(moby) == 135 and moby[0].id == "moby-dick/data/chapter_1.txt"
    assert "Call me Ishmael" in moby[0].text and moby[9].id == "moby-dick/data/chapter_10.txt"


def test_npm_corpus_without_npm_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InputError, match="apt-get install npm"):
        Corpus("moby-dick")
