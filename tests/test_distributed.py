"""Distributed training under torchrun with the gloo backend: a 2-process data-parallel run,
a 2-process latent-sharded run (AuxK active) and a 2 x 2 grid each end with the weights of
one process on the same data; a checkpoint written by one process resumes on two."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli
from safetensors.torch import load_file

from saelab.activations.source import MatrixSource
from saelab.data.toy import ToyDataConfig, make_toy_data
from saelab.train.config import TrainConfig
from saelab.train.trainer import Trainer

pytestmark = pytest.mark.slow
ARGS = ["--n-latents", "256", "--k", "4", "--tokens", "40960", "--batch-size", "1024", "--lr", "3e-3",
        "--dead-after-tokens", "2048", "--checkpoint-every-steps", "20", "--no-progress"]


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    data = make_toy_data(ToyDataConfig(d_in=32, n_features=64, avg_active=3, seed=3))
    x, _ = data.sample(20_000, seed=1)
    path = tmp_path_factory.mktemp("dist") / "x.npy"
    np.save(path, x.numpy())
    return path


@pytest.fixture(scope="module")
def one_process(acts, tmp_path_factory):
    """The one-process result for each optimiser (what every distributed run must equal)."""
    done: dict[str, dict[str, torch.Tensor]] = {}

    def result(optimizer: str = "signum") -> dict[str, torch.Tensor]:
        if optimizer not in done:
            out = tmp_path_factory.mktemp("one") / "sae"
            proc = run_cli("train", "--acts", str(acts), *ARGS, "--optimizer", optimizer, "--out", str(out))
            assert proc.returncode == 0, proc.stderr
            done[optimizer] = load_file(out / "sae_weights.safetensors")
        return done[optimizer]

    return result


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
         "-m", "saelab", "train", "--distributed", *args],
        capture_output=True, text=True, timeout=600,
    )


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        gap = float((a[name] - b[name]).abs().max())
        assert gap < 1e-5, (name, gap)


@pytest.mark.parametrize(("processes", "shards", "optimizer"),
                         [(2, 1, "signum"), (2, 2, "signum"), (4, 2, "adam")],
                         ids=["data-parallel", "latent-sharded", "2x2-grid-adam"])
def test_distributed_matches_one_process(acts, one_process, tmp_path, processes, shards, optimizer):
    """Each process layout ends with the one-process weights, with the default optimiser (the sign
    of the all-reduced gradient) and with Adam, under which latents die within these 40 steps
    and so the dead-latent loss (AuxK) is at work too."""
    out = tmp_path / "sae"
    proc = torchrun(processes, "--latent-shards", str(shards), "--acts", str(acts), *ARGS,
                    "--optimizer", optimizer, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{processes // shards} data-parallel x {shards} latent shards" in proc.stderr
    assert_same(load_file(out / "sae_weights.safetensors"), one_process(optimizer))
    log = (out / "metrics.jsonl").read_text().splitlines()
    assert len(log) == 2  # rank 0 alone writes it
    if optimizer == "adam":
        assert '"auxk": 0.0' not in log[-1]  # the dead-latent loss was at work


def test_a_one_process_checkpoint_resumes_on_two(acts, one_process, tmp_path):
    out = tmp_path / "sae"
    cfg = TrainConfig(n_latents=256, k=4, tokens=40960, batch_size=1024, lr=3e-3, dead_after_tokens=2048,
                      checkpoint_every_steps=20, progress=False)
    half = Trainer(MatrixSource(torch.from_numpy(np.load(acts))), cfg, out)
    half.begin()
    batches = half.source.batches(cfg.batch_size, cfg.seed)
    for _ in range(20):
        half.train_step(next(batches))  # the checkpoint at step 20 of 40
    assert not (out / "sae_weights.safetensors").exists()
    proc = torchrun(2, "--latent-shards", "2", "--acts", str(acts), *ARGS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(load_file(out / "sae_weights.safetensors"), one_process())


def test_distributed_flags_need_torchrun(acts, tmp_path):
    x = str(acts)
    assert_one_line_error(run_cli("train", "--acts", x, "--latent-shards", "2", "--out", str(tmp_path / "a")),
                          "--latent-shards needs --distributed")
    assert_one_line_error(run_cli("train", "--acts", x, "--distributed", "--out", str(tmp_path / "b")),
                          "torchrun")
    proc = torchrun(2, "--latent-shards", "2", "--arch", "relu", "--acts", x, "--out", str(tmp_path / "c"))
    assert proc.returncode != 0 and "latent sharding is for topk SAEs, not relu" in proc.stderr
