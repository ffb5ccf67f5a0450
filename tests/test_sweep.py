"""Many SAEs on one pass over the data: every cell equals the same SAE trained alone (also
when some cells resume from further on), the grid's figures move the right way, the
scaling-law fit recovers planted exponents, and the CLI writes the CSV, frontier and fit."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli
from safetensors.torch import load_file

from saelab.activations.source import MatrixSource
from saelab.data.toy import ToyDataConfig, make_toy_data
from saelab.eval.scaling import fit_scaling_law, predict, run_sweep
from saelab.train.config import TrainConfig
from saelab.train.sweep import cell_name, cells
from saelab.train.trainer import Trainer


@pytest.fixture(scope="module")
def toy():
    data = make_toy_data(ToyDataConfig(d_in=32, n_features=64, avg_active=3, seed=3))
    x, _ = data.sample(40_000, seed=1)
    x_eval, _ = data.sample(5_000, seed=2)
    return x, x_eval


BASE = TrainConfig(architecture="topk", tokens=24_576, batch_size=1024, lr=3e-3, progress=False,
                   checkpoint_every_steps=8)
GRID = {"n_latents": [64, 128], "k": [4, 8]}


def test_sweep_cells_equal_separate_runs_and_resume(toy, tmp_path):
    x, x_eval = toy
    out = tmp_path / "sweep"
    # one cell already trained to the end, one killed half way: the sweep must pick both up
    done_cfg, half_cfg = cells(BASE, GRID)[1], cells(BASE, GRID)[2]
    Trainer(MatrixSource(x), done_cfg, out / cell_name(done_cfg, 32)).run()
    half = Trainer(MatrixSource(x), half_cfg, out / cell_name(half_cfg, 32))
    half.begin()
    batches = MatrixSource(x).batches(BASE.batch_size, BASE.seed)
    for _ in range(8):  # a checkpoint lands at step 8
        half.train_step(next(batches))
    before = (out / cell_name(done_cfg, 32) / "sae_weights.safetensors").stat().st_mtime_ns

    r = run_sweep(MatrixSource(x), BASE, GRID, out, eval_source=MatrixSource(x_eval))
    assert (out / cell_name(done_cfg, 32) / "sae_weights.safetensors").stat().st_mtime_ns == before
    assert [row["name"] for row in r.rows] == ["topk-n64-k4", "topk-n64-k8", "topk-n128-k4", "topk-n128-k8"]
    for cfg in cells(BASE, GRID):
        alone = Trainer(MatrixSource(x), cfg, tmp_path / "alone" / cell_name(cfg, 32)).run()
        swept = load_file(out / cell_name(cfg, 32) / "sae_weights.safetensors")
        for name, t in alone.state_dict().items():
            assert torch.equal(swept[name], t), (cell_name(cfg, 32), name)
    # the figures move the way they must: more active latents, better reconstruction
    fvu = {(row["n_latents"], row["k"]): row["fvu"] for row in r.rows}
    assert fvu[64, 8] < fvu[64, 4] and fvu[128, 8] < fvu[128, 4]
    assert all(row["l0"] == pytest.approx(row["k"]) for row in r.rows)
    assert all(row["eval"] == "held-out" for row in r.rows)
    assert r.scaling is not None and r.scaling["points"] == 4
    assert (out / "scaling.png").stat().st_size > 10_000
    assert r.frontier.stat().st_size > 10_000
    # a second run of the finished sweep reuses the SAEs and their measurements
    import saelab.eval.scaling as scaling_mod

    def no_measuring(*a, **k):
        raise AssertionError("a finished sweep measured its SAEs again")

    real, scaling_mod.evaluate_reconstruction = scaling_mod.evaluate_reconstruction, no_measuring
    try:
        again = run_sweep(MatrixSource(x), BASE, GRID, out, eval_source=MatrixSource(x_eval))
    finally:
        scaling_mod.evaluate_reconstruction = real
    assert again.rows == json.loads(json.dumps(r.rows))


def test_scaling_law_fit_recovers_planted_exponents():
    rng = np.random.default_rng(0)
    truth = {"alpha": 1.5, "beta_k": -0.6, "beta_n": -0.25, "gamma": 0.03}
    ns, ks = np.meshgrid([512, 1024, 2048, 4096, 8192], [8, 16, 32, 64])
    ns, ks = ns.ravel(), ks.ravel()
    loss = [predict(truth, n, k) * float(np.exp(rng.normal(0, 1e-3))) for n, k in zip(ns, ks, strict=True)]
    fit = fit_scaling_law(ns, ks, loss)
    for key, value in truth.items():
        assert fit[key] == pytest.approx(value, abs=0.02), key
    assert fit["r2"] > 0.999
    with pytest.raises(Exception, match="at least 4"):
        fit_scaling_law([1, 2, 3], [1, 2, 3], [1, 2, 3])


def test_sweep_cli(toy, tmp_path):
    x, _ = toy
    np.save(tmp_path / "x.npy", x.numpy())
    out = tmp_path / "cli"
    proc = run_cli("sweep", "--acts", str(tmp_path / "x.npy"), "--grid-n-latents", "64,128",
                   "--grid-k", "4,8", "--tokens", "8192", "--batch-size", "1024", "--out", str(out),
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "L(N, K) fit" in proc.stdout and "topk-n128-k8" in proc.stdout
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["eval"] for r in rows} == {"training rows"}
    assert json.loads((out / "scaling.json").read_text())["points"] == 4
    assert_one_line_error(
        run_cli("sweep", "--acts", str(tmp_path / "x.npy"), "--grid-k", "4,eight", "--out", str(out)),
        "'4,eight'",
    )
    assert_one_line_error(
        run_cli("sweep", "--acts", str(tmp_path / "x.npy"), "--grid-k", "4,4", "--out", str(out)),
        "same SAE",
    )
