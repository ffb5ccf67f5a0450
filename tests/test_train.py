"""The trainer: it recovers ground-truth features, resumes exactly, and fails safely."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from saelab import SAE, SaelabError, TrainConfig, TrainingDiverged, train_sae
from saelab.activations.source import MatrixSource
from saelab.data.toy import ToyDataConfig, make_toy_data
from saelab.eval.metrics import evaluate_reconstruction, mmcs
from saelab.train.trainer import Trainer


@pytest.fixture(scope="module")
def toy():
    data = make_toy_data(ToyDataConfig(d_in=32, n_features=64, avg_active=3, seed=3))
    x, _ = data.sample(60_000, seed=1)
    x_eval, _ = data.sample(5_000, seed=2)
    return data, x, x_eval


@pytest.fixture(scope="module")
def superposed():
    """The benchmark's default data: 256 features superposed in 64 dimensions."""
    data = make_toy_data(ToyDataConfig())
    x, _ = data.sample(100_000, seed=1)
    x_eval, _ = data.sample(10_000, seed=2)
    return data, x, x_eval


@pytest.mark.parametrize(
    ("arch", "extra"), [("topk", {"k": 5}), ("relu", {"l1_coefficient": 2.0})]
)
def test_trained_sae_recovers_ground_truth_features(superposed, arch, extra) -> None:
    data, x, x_eval = superposed
    sae = train_sae(x, architecture=arch, n_latents=256, tokens=300_000, batch_size=256,
                    lr=3e-3, progress=False, seed=0, **extra)
    score, recovered = mmcs(sae.W_dec, data.features)
    assert score >= 0.95, f"{arch}: MMCS {score:.3f}"
    assert recovered >= 0.9
    m = evaluate_reconstruction(sae, MatrixSource(x_eval).rows(4096))
    assert m.fvu < 0.5
    if arch == "topk":
        assert m.l0 <= 5


def test_small_dictionary_cannot_recover_all_features(toy) -> None:
    data, x, _ = toy
    sae = train_sae(x, architecture="topk", k=3, n_latents=32, tokens=100_000, batch_size=256,
                    lr=3e-3, progress=False)
    assert mmcs(sae.W_dec, data.features)[0] < 0.85


def test_every_architecture_trains_and_lowers_fvu(toy) -> None:
    _, x, x_eval = toy
    for arch, own in (("batchtopk", {"k": 3}), ("jumprelu", {}), ("gated", {"l1_coefficient": 1.0})):
        sae = train_sae(x, architecture=arch, n_latents=128, tokens=60_000, batch_size=256,
                        lr=3e-3, progress=False, **own)
        m = evaluate_reconstruction(sae, MatrixSource(x_eval).rows(2048))
        assert m.fvu < 0.6, f"{arch}: FVU {m.fvu:.3f}"
        assert m.l0 < 64, f"{arch}: L0 {m.l0:.1f}"


@pytest.mark.parametrize(("arch", "extra"), [("topk", {"k": 5}), ("relu", {"l1_coefficient": 2.0})])
def test_bfloat16_matmuls_keep_float32_weights_and_quality(superposed, arch, extra) -> None:
    """matmul_dtype=bfloat16: the parameters and Adam state stay float32, and the SAE ends
    within 0.01 FVU and MMCS of the all-float32 run on the same data."""
    data, x, x_eval = superposed
    common = dict(architecture=arch, n_latents=256, tokens=150_000, batch_size=256, lr=3e-3,
                  optimizer="adam", progress=False, checkpoint_every_steps=0, **extra)
    ref = train_sae(x, **common)
    t = Trainer(MatrixSource(x), TrainConfig(matmul_dtype="bfloat16", **common))
    mixed = t.run()
    assert mixed.W_dec.dtype == torch.float32
    assert all(v.dtype == torch.float32 for st in t.optimizer.state.values()
               for v in st.values() if v.dim())
    assert t.optimizer.defaults.get("fused")
    fvus = [evaluate_reconstruction(s, MatrixSource(x_eval).rows(4096)).fvu for s in (ref, mixed)]
    assert abs(fvus[1] - fvus[0]) < 0.01, fvus
    assert abs(mmcs(mixed.W_dec, data.features)[0] - mmcs(ref.W_dec, data.features)[0]) < 0.01
    assert not torch.equal(mixed.W_dec, ref.W_dec)  # the bfloat16 matmul did run


def test_matmul_dtype_needs_float32_parameters() -> None:
    with pytest.raises(SaelabError, match="matmul_dtype"):
        train_sae(torch.randn(64, 8), architecture="topk", k=2, n_latents=16, tokens=64,
                  dtype="float16", matmul_dtype="bfloat16", progress=False)


FAULTS_SCRIPT = """
import resource, torch
from saelab.train import memory

def faults_of_a_fresh_block():
    torch.ones(16 << 20).sum()  # 64 MiB (above glibc's largest mmap threshold) touched, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(faults_of_a_fresh_block())
memory.retain()
faults_of_a_fresh_block()
print(faults_of_a_fresh_block())
memory.release()
print(faults_of_a_fresh_block())
"""


def test_training_reuses_freed_memory_and_gives_it_back(toy) -> None:
    """While a run is on, a freed large block is reused without page faults (glibc keeps it);
    after the run (finished or failed) glibc's defaults are back."""
    from saelab.train import memory

    # A fresh process each time: where ASLR puts the libraries can stop the heap from growing in
    # place, and glibc then maps the block anyway (seen once in a full-suite run), so the
    # best of three processes is taken.
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True,
                             check=True).stdout.split()
        runs.append(tuple(int(v) for v in out))
        if runs[-1][1] < 1_000:
            break
    before, kept, after = min(runs, key=lambda r: r[1])
    assert before > 15_000 and after > 15_000  # 16,384 4-KiB pages faulted in again
    assert kept < 1_000, runs
    import gc

    gc.collect()  # trainers of earlier tests that never ended give theirs back when collected
    assert memory._users == 0
    _, x, _ = toy
    train_sae(x, architecture="topk", k=3, n_latents=64, tokens=2_000, batch_size=256, progress=False)
    assert memory._users == 0
    begun = Trainer(MatrixSource(x), TrainConfig(architecture="topk", k=3, n_latents=64, tokens=2_000,
                                                 batch_size=256, progress=False))
    begun.begin()
    assert memory._users == 1
    del begun  # begun, never ended, dropped
    gc.collect()
    assert memory._users == 0

    class Broken(MatrixSource):
        def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
            for i, b in enumerate(super().batches(batch_size, seed, start_step)):
                if i == 3:
                    raise OSError("disk gone")
                yield b

    t = Trainer(Broken(x[:512]), TrainConfig(architecture="topk", k=3, n_latents=64, tokens=4_096,
                                             batch_size=256, progress=False))
    with pytest.raises(OSError, match="disk gone"):
        t.run()
    assert t.step == 3 and memory._users == 0
    # a run that would need more than half the available memory goes without
    assert not memory.retain(footprint_bytes=10**15) and memory._users == 0


def test_input_scale_is_stored_and_folded(toy, tmp_path) -> None:
    _, x, x_eval = toy
    sae = train_sae(x * 100, architecture="topk", k=3, n_latents=64, tokens=20_000,
                    batch_size=256, progress=False, out_dir=tmp_path / "run",
                    checkpoint_every_steps=0)
    cfg = json.loads((tmp_path / "run" / "cfg.json").read_text())
    scale = cfg["saelab"]["activation_norm_scale"]
    expected = (x.shape[1] / float((x * 100).double().pow(2).sum(-1).mean())) ** 0.5
    assert scale == pytest.approx(expected, rel=0.05)
    # The saved SAE works on raw (unscaled) inputs.
    m = evaluate_reconstruction(SAE.load(tmp_path / "run"), MatrixSource(x_eval * 100).rows(2048))
    assert m.fvu < 0.8
    assert sae.cfg.activation_norm_scale == pytest.approx(scale)


def test_resampling_revives_dead_latents(toy) -> None:
    _, x, _ = toy
    cfg = TrainConfig(architecture="relu", n_latents=256, tokens=80_000, batch_size=256,
                      l1_coefficient=8.0, lr=3e-3, progress=False, resample_every_steps=100,
                      dead_after_tokens=10_000)
    trainer = Trainer(MatrixSource(x), cfg)
    with torch.no_grad():  # kill half the latents: their encoder can never fire
        trainer.sae.W_enc[:, :128] = 0.0
        trainer.sae.b_enc[:128] = -5.0
    trainer.run()
    fired = (trainer.sae.encode(x[:20_000] * trainer.scale) > 0).any(0)
    assert fired[:128].float().mean() > 0.5


# ------------------------------------------------------------------------- resume
def _train_cmd(acts: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "saelab", "train", "--acts", str(acts), "--out", str(out),
            "--arch", "topk", "--n-latents", "128", "--k", "4", "--tokens", "1200000",
            "--batch-size", "512", "--seed", "7", "--checkpoint-every-steps", "50",
            "--log-every-steps", "10", "--dead-after-tokens", "20000", "--no-progress"]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_identical_weights(toy, tmp_path) -> None:
    _, x, _ = toy
    acts = tmp_path / "acts.npy"
    np.save(acts, x.numpy())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cmd(acts, tmp_path / "whole"), check=True, env=env,
                   capture_output=True)

    proc = subprocess.Popen(_train_cmd(acts, tmp_path / "killed"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 100:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < killed_at < 2343
    assert not (tmp_path / "killed" / "cfg.json").exists()

    done = subprocess.run(_train_cmd(acts, tmp_path / "killed"), env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    a = load_file(str(tmp_path / "whole" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "killed" / "sae_weights.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "the metrics log repeats or skips steps after resume"
    assert steps[-1] == 2343


@pytest.mark.parametrize("optimizer", ["adam", "signum"])
def test_resume_in_process_matches_uninterrupted(toy, tmp_path, optimizer) -> None:
    """A run stopped mid-way (here: by an exception) and resumed ends where a whole run does,
    with each optimiser (its state, and for signum the average, in the checkpoint), through
    resampling, which makes the optimiser forget the restarted latents."""
    _, x, _ = toy
    cfg = TrainConfig(architecture="relu", n_latents=64, tokens=40_000, batch_size=256,
                      checkpoint_every_steps=20, resample_every_steps=40, dead_after_tokens=5_000,
                      optimizer=optimizer, progress=False, seed=3, device="cpu")
    whole = Trainer(MatrixSource(x), cfg, tmp_path / "a").run()

    class Stop(Exception):
        pass

    class Flaky(MatrixSource):
        def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
            for i, b in enumerate(super().batches(batch_size, seed, start_step)):
                if start_step == 0 and i == 97:
                    raise Stop
                yield b

    with pytest.raises(Stop):
        Trainer(Flaky(x), cfg, tmp_path / "b").run()
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 80
    # The optimiser steps the encoder as contiguous latent rows; the checkpoint keeps its state
    # (Adam's moments, signum's z) in W_enc's own [d_in, n] layout.
    names = list(ck["model"])
    for i, st in ck["optimizer"]["state"].items():
        held = [v for v in st.values() if v.dim()]
        assert held and all(v.shape == ck["model"][names[i]].shape for v in held), names[i]
    resumed = Trainer(Flaky(x), cfg, tmp_path / "b").run()
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), name


def test_resume_refuses_changed_settings(toy, tmp_path) -> None:
    _, x, _ = toy
    cfg = TrainConfig(architecture="topk", k=3, n_latents=64, tokens=5_000, batch_size=256,
                      progress=False)
    Trainer(MatrixSource(x), cfg, tmp_path).run()
    other = TrainConfig(**{**cfg.model_dump(), "k": 5})
    with pytest.raises(SaelabError, match=r"other settings: sae\.k \(3 -> 5\)"):
        Trainer(MatrixSource(x), other, tmp_path).run()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(toy, tmp_path) -> None:
    _, x, _ = toy

    class Poisoned(MatrixSource):
        def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
            for i, b in enumerate(super().batches(batch_size, seed, start_step), start=start_step):
                if i == 36:  # the 37th step sees an overflowing row
                    b[0, 0] = 3e38
                yield b

    cfg = TrainConfig(architecture="topk", k=3, n_latents=64, tokens=20_000, batch_size=256,
                      checkpoint_every_steps=10, progress=False, normalize_inputs=False)
    with pytest.raises(TrainingDiverged, match=r"at step 37.*last good checkpoint \(step 30\)") as e:
        Trainer(Poisoned(x), cfg, tmp_path).run()
    assert e.value.step == 37
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 30
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_balanced_init_keeps_a_large_relu_dictionary_on_the_data_scale() -> None:
    """With unit-norm decoder rows and W_enc = W_decᵀ, half of a fresh ReLU dictionary fires and
    the reconstruction is about n / (2 d_in) times the input; the balanced init scales it to
    about the input, and applies to the L1 family only."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g)
    fvus = {}
    for init in ("unit", "balanced"):
        cfg = TrainConfig(architecture="relu", n_latents=2048, init_scale=init, b_dec_init="zeros",
                          tokens=4096, batch_size=4096, progress=False, checkpoint_every_steps=0)
        t = Trainer(MatrixSource(x), cfg)
        with torch.no_grad():
            fvus[init] = float(((t.sae(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert fvus["unit"] > 100 and fvus["balanced"] < 3, fvus
    with pytest.raises(ValidationError, match="init_scale is a setting of relu, gated, not of topk"):
        TrainConfig(architecture="topk", init_scale="balanced")
