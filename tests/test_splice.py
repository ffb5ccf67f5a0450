"""Splice evaluation in the real models: a perfect reconstruction recovers all the loss,
a zero one none of it; the CLI reports it and refuses an SAE that does not fit."""

from __future__ import annotations

import json
import math

import pytest
from helpers import assert_one_line_error, identity_sae, run_cli, write_corpus

from saelab.config import TextConfig
from saelab.eval.splice import splice_eval

HOOK = "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> TextConfig:
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=30, words=80)
    return TextConfig(corpus=str(corpus), context_length=48, batch_size=4, heldout_fraction=0.5)


@pytest.mark.slow
def test_perfect_and_zero_reconstructions_in_smollm(smollm, text):
    perfect = splice_eval(identity_sae(576, HOOK), smollm, text, tokens=300, progress=False)
    assert perfect.tokens >= 300
    assert perfect.fvu < 1e-10
    assert perfect.ce_recovered == pytest.approx(1.0, abs=1e-4)
    assert perfect.ce_recovered_sae_positions == pytest.approx(1.0, abs=1e-4)
    assert perfect.ce_recovered_mean == pytest.approx(1.0, abs=1e-4)
    assert perfect.kl == pytest.approx(0.0, abs=1e-6)
    assert perfect.ce_zero_sae_positions > perfect.ce_mean > perfect.ce_clean  # ablations hurt, zero most
    assert 0.5 < perfect.ce_clean < 8
    zero = splice_eval(identity_sae(576, HOOK, zero=True), smollm, text, tokens=300, progress=False)
    assert zero.fvu > 1  # x̂ = 0: FVU = E‖x‖² / Var(x) ≥ 1
    # saelab 0.5's convention: the zero ablation is exactly what a zero SAE splices in
    assert zero.ce_recovered_sae_positions == pytest.approx(0.0, abs=1e-6)
    assert zero.ce_spliced == pytest.approx(zero.ce_zero_sae_positions, abs=1e-9)
    assert zero.kl > 0.1
    # The default, SAELens/SAEBench's: the zero ablation takes every position, BOS included; with
    # nothing left in the residual stream the model predicts uniformly, CE = ln(vocab)
    assert zero.ce_zero == pytest.approx(perfect.ce_zero, abs=1e-9)
    assert zero.ce_zero == pytest.approx(math.log(49152), abs=1e-3)
    expected = (zero.ce_zero - zero.ce_spliced) / (zero.ce_zero - zero.ce_clean)
    assert zero.ce_recovered == pytest.approx(expected, abs=1e-12)
    # A zero SAE leaves BOS alone, and BOS alone makes the model confidently wrong: worse than the
    # uniform prediction, so under this convention a zero SAE scores below 0 (here about -1.1)
    assert zero.ce_spliced > zero.ce_zero and zero.ce_recovered < -0.5
    d = zero.as_dict()
    assert set(d["ce_recovered_conventions"]) == {"ce_recovered", "ce_recovered_sae_positions",
                                                  "ce_recovered_mean"}
    assert "SAELens" in d["ce_recovered_conventions"]["ce_recovered"]


def test_encoder_reports_embedding_cosine(minilm, text):
    perfect = splice_eval(identity_sae(384, HOOK), minilm, text, tokens=200, progress=False)
    assert perfect.ce_clean is None
    assert perfect.cos_spliced == pytest.approx(1.0, abs=1e-5)
    assert perfect.cos_zero < perfect.cos_spliced
    zero = splice_eval(identity_sae(384, HOOK, zero=True), minilm, text, tokens=200, progress=False)
    assert zero.cos_spliced == pytest.approx(zero.cos_zero, abs=1e-6)


def test_cli_splice_eval_and_mismatches(tmp_path, text):
    good = tmp_path / "good"
    identity_sae(384, HOOK).save(good)
    # the SAE's cfg.json names no model; --model picks one
    common = ["--corpus", text.corpus, "--tokens", "100", "--context-length", "48",
              "--heldout-fraction", "0.5", "--json"]
    proc = run_cli("eval", str(good), "--model", "minilm-l6", *common)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["cos_spliced"] == pytest.approx(1.0, abs=1e-5)
    assert result["hook_name"] == HOOK and result["l0"] > 0
    wide = tmp_path / "wide"
    identity_sae(576, HOOK).save(wide)
    assert_one_line_error(run_cli("eval", str(wide), "--model", "minilm-l6", *common),
                          "d_in = 576", "384 wide")
    assert_one_line_error(run_cli("eval", str(good), "--model", "minilm-l6", "--hook",
                                  "blocks.1.hook_resid_post", *common), f"trained on {HOOK}")
    assert_one_line_error(run_cli("eval", str(good)), "names no model")
