"""saelab bench: sparse probing on exact labels, and the report card of several SAEs, resumable."""

from __future__ import annotations

import csv
import io
import json
import tokenize

import pytest
import torch
from helpers import run_cli, write_corpus

from saelab.eval.tasks import TOKEN_TASKS, WINDOW_TASKS, code_texts, python_categories, window_tasks
from saelab.sae.base import create
from saelab.sae.config import SAEConfig

HOOK = "blocks.0.hook_resid_post"


def _sae(seed: int, n: int = 512):
    sae = create(SAEConfig(architecture="topk", d_in=128, n_latents=n, k=16, hook_name=HOOK,
                           model_name="one-layer"))
    sae.init_weights(torch.Generator().manual_seed(seed))
    return sae


def test_python_token_labels_are_tokenize_s() -> None:
    src = 'x = 12  # a comment\nif x:\n    print(f"v={x!r}", "s")\n'
    spans = {(src[a:b], c) for a, b, c in python_categories(src)}
    assert {("x", "identifier"), ("12", "number"), ("# a comment", "comment"), ("if", "keyword"),
            ("print", "identifier"), ('f"v={x!r}"', "string"), ('"s"', "string")} <= spans
    assert all(c != "identifier" for t, c in spans if t == "if")
    with pytest.raises((tokenize.TokenError, SyntaxError)):
        python_categories('s = """never closed\n')
    texts = code_texts(5)
    assert len(texts) == 5 and all(any(c == "keyword" for *_, c in spans) for _, spans in texts)


def test_window_tasks_are_balanced_and_labelled_by_source() -> None:
    tasks = {t.name: t for t in window_tasks(30)}
    assert set(tasks) == set(WINDOW_TASKS)
    for t in tasks.values():
        assert len(t.positives) == len(t.negatives) == 30, t.name
        assert not set(t.positives) & set(t.negatives), t.name
    assert sum("def " in p or "import " in p for p in tasks["docs_vs_code"].negatives) > 10  # stdlib code


@pytest.mark.slow
def test_bench_cards_sparse_probing_sanity_and_resume(tmp_path) -> None:
    """Two SAEs on the one-layer model through saelab bench. Sparse probing: the residual-stream
    probe is the ceiling (at least as accurate as one latent on average, near perfect on prose
    against code), more latents do at least as well as one, every task is reported with its
    split sizes. The cards, CSV, table and plot are written; a re-run measures only what is
    missing."""
    for i in (0, 1):
        _sae(i, n=256 * (i + 1)).save(tmp_path / f"sae{i}")
    corpus = write_corpus(tmp_path / "corpus", n_docs=16, words=60)
    args = ["bench", str(tmp_path / "sae0"), str(tmp_path / "sae1"), "--out", str(tmp_path / "out"),
            "--corpus", str(corpus), "--tokens", "256", "--per-class", "60", "--code-passages", "80",
            "--device", "cpu", "--no-progress"]
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / "out"
    r = json.loads((out / "sae0" / "sparse_probing.json").read_text())
    assert set(r["tasks"]) == set(WINDOW_TASKS + TOKEN_TASKS)
    for t in r["tasks"].values():
        assert t["n_train"] + t["n_test"] == 120 and t["n_test"] == 24, t["task"]
        assert len(t["latents"]["k=5"]) == 5
    mean = r["mean"]
    assert mean["baseline_accuracy"] >= mean["k=1"]
    assert mean["k=20"] >= mean["k=1"] - 0.02
    assert r["tasks"]["moby_vs_code"]["baseline_accuracy"] > 0.95
    assert r["tasks"]["py_comment"]["baseline_accuracy"] > 0.75  # a one-layer model sees comments
    assert 0.5 < mean["baseline_accuracy"] <= 1.0
    rows = list(csv.DictReader(io.StringIO((out / "bench.csv").read_text())))
    assert [r["sae"] for r in rows] == ["sae0", "sae1"]
    assert {"fvu", "cossim", "rel_bias", "ce_recovered", "probe_baseline", "probe_k1",
            "probe_k20"} <= set(rows[0])
    assert float(rows[0]["probe_baseline"]) == pytest.approx(mean["baseline_accuracy"])
    card = json.loads((out / "sae1.json").read_text())
    assert card["n_latents"] == 512 and set(card["metrics"]) == {"core", "sparse_probing"}
    assert 0 < card["metrics"]["core"]["cossim"] <= 1
    assert (out / "bench.png").stat().st_size > 5000 and "| sae0 |" in (out / "bench.md").read_text()
    # A second run measures nothing again; a metric whose result was removed is measured again.
    (out / "sae1" / "sparse_probing.json").unlink()
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("reused") == 3, p.stdout
    assert "[sae1] sparse_probing: " in p.stdout and "[sae1] sparse_probing: reused" not in p.stdout
