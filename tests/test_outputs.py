"""Outputs are never lost or left half-written: locks, early checks, one-line errors.

Each bad input ends in one line on stderr, a non-zero exit, no traceback, and nothing left
where a later run would read it (saelab.outputs, the trainer's checks, saelab.models).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli

from saelab.cli import main
from saelab.data.toy import ToyDataConfig, make_toy_data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("outputs")
    x, _ = make_toy_data(ToyDataConfig(d_in=16, n_features=32, avg_active=2, seed=5)).sample(4_000, seed=1)
    np.save(folder / "acts.npy", x.numpy())
    np.save(folder / "row.npy", x[:1].numpy())
    np.save(folder / "column.npy", (1e3 * torch.randn(4_000, 1)).numpy())
    return folder


TRAIN = ["--arch", "topk", "--n-latents", "64", "--k", "2", "--batch-size", "256", "--no-progress"]


def _train(acts: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "saelab", "train", "--acts", str(acts), "--out", str(out), *TRAIN, *extra]


def _wait_for(cond: Callable[[], bool], seconds: float = 60) -> None:
    end = time.time() + seconds
    while not cond():
        assert time.time() < end, "timed out waiting"
        time.sleep(0.05)


def _log_started(out: Path) -> Callable[[], bool]:
    return lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0


def test_a_second_process_on_the_same_out_stops_at_once_naming_the_holder(data, tmp_path):
    out = tmp_path / "sae"
    first = subprocess.Popen(_train(data / "acts.npy", out, "--tokens", "3000000", "--log-every-steps", "5"),
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(_log_started(out))
        second = subprocess.run(_train(data / "acts.npy", out, "--tokens", "20000", "--k", "3"),
                                capture_output=True, text=True, timeout=120)
        assert_one_line_error(second, f"{out} is in use by saelab train (process {first.pid})")
        harvest = run_cli("harvest", "--model", "one-layer", "--hook", "blocks.0.hook_mlp_out",
                          "--tokens", "1000", "--out", str(out))
        assert_one_line_error(harvest, f"is in use by saelab train (process {first.pid})")
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
    # the holder's run is the only one in the folder: its settings, its log in order
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["train_config"]["sae"]["k"] == 2


def test_the_lock_of_a_killed_process_is_taken_over(data, tmp_path):
    out = tmp_path / "sae"
    cmd = _train(data / "acts.npy", out, "--tokens", "200000", "--checkpoint-every-steps", "20")
    first = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (out / "checkpoint.pt").is_file())
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert f"process {first.pid}" in (out / ".saelab.lock").read_text()  # the file stays; its lock does not
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (out / "sae_weights.safetensors").is_file()


def _sae(tmp_path: Path, data: Path) -> Path:
    out = tmp_path / "sae"
    args = ["train", "--acts", str(data / "acts.npy"), "--out", str(out), "--tokens", "20000", *TRAIN]
    assert main(args) == 0
    return out


def _cases(tmp: Path, data: Path) -> list[tuple[str, list[str], str, Path | None]]:
    """(what, arguments, words the one line holds, a path that must not exist afterwards)."""
    acts = str(data / "acts.npy")
    (tmp / "a-file").write_text("x")
    (tmp / "a-folder").mkdir()
    listed = tmp / "listed"
    listed.mkdir()
    (listed / "cfg.json").write_text("[1, 2, 3]")
    (listed / "sae_weights.safetensors").write_bytes(b"")
    harvest = ["harvest", "--model", "one-layer", "--hook", "blocks.0.hook_mlp_out", "--tokens", "1000"]
    return [
        ("train --out is a file", ["train", "--acts", acts, "--out", str(tmp / "a-file"), *TRAIN],
         "--out", None),
        ("harvest --out is a file", [*harvest, "--out", str(tmp / "a-file")], "is a file", None),
        ("atlas --out is a folder", ["atlas", str(tmp / "sae"), "--out", str(tmp / "a-folder")],
         "is a folder, and this command writes one file there", None),
        ("an --out that cannot be written", ["train", "--acts", acts, "--out", "/proc/saelab/sae", *TRAIN],
         "/proc/saelab", None),
        ("cfg.json holds a list", ["eval", str(listed), "--acts", acts], "holds a JSON list", None),
        ("a single row", ["train", "--acts", str(data / "row.npy"), "--out", str(tmp / "one-row"), *TRAIN],
         "fewer than one batch", tmp / "one-row"),
        ("a batch larger than the data",
         ["train", "--acts", acts, "--out", str(tmp / "huge-batch"), *TRAIN, "--batch-size", "1000000000"],
         "fewer than one batch (--batch-size 1,000,000,000)", tmp / "huge-batch"),
        ("k above the columns", ["train", "--acts", acts, "--out", str(tmp / "big-k"), *TRAIN, "--k", "20"],
         "k = 20 is more than the 16 columns", tmp / "big-k"),
        ("a dictionary beyond memory",
         ["train", "--acts", acts, "--out", str(tmp / "huge"), *TRAIN, "--n-latents", "1000000000"],
         "this run needs about", tmp / "huge"),
        ("a context beyond the model's positions",
         [*harvest, "--context-length", "100000", "--out", str(tmp / "long")],
         "beyond one-layer's 256 positions; use at most 256", tmp / "long"),
        ("a misspelt model alias",
         ["harvest", "--model", "smolm2-135m", "--hook", "blocks.0.hook_mlp_out",
          "--out", str(tmp / "alias")],
         "did you mean smollm2-135m?", tmp / "alias"),
        ("a missing corpus", [*harvest, "--corpus", str(tmp / "no-corpus"), "--out", str(tmp / "nothing")],
         "no such file or folder", tmp / "nothing"),
    ]


def test_bad_input_ends_in_one_line_and_leaves_nothing(data, tmp_path, capsys):
    _sae(tmp_path, data)
    capsys.readouterr()
    cases = _cases(tmp_path, data)
    for what, args, words, absent in cases:
        assert main(args) == 1, what  # in process: an exception would fail the test itself
        err = capsys.readouterr().err.strip().splitlines()
        assert err and words in err[-1] and err[-1].startswith(f"saelab {args[0]}: error: "), (what, err)
        if absent is not None:
            assert not absent.exists(), what
    # the same through the installed command, as a user meets it: no traceback
    r = run_cli(*cases[0][1])
    assert_one_line_error(r, "--out")


def test_a_run_that_learns_nothing_is_not_reported_as_a_success(data, tmp_path):
    r = run_cli("train", "--acts", str(data / "column.npy"), "--arch", "relu", "--n-latents", "128",
                "--tokens", "20000", "--batch-size", "256", "--no-progress", "--out", str(tmp_path / "s"))
    assert_one_line_error(r, "did not learn: FVU", "predicting their mean gives 1")
    assert (tmp_path / "s" / "sae_weights.safetensors").is_file()  # kept for inspection


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_while_saving_is_one_line_and_leaves_no_partial_file(
        data, tmp_path, monkeypatch, capsys, code):
    out = tmp_path / "sae"
    real = torch.save

    def failing(obj, f, *args, **kwargs):
        if str(f).startswith(str(out / ".checkpoint.pt.")):
            with open(f, "wb") as h:
                h.write(b"half")  # what a full disk leaves: a partial temporary file
            raise OSError(code, os.strerror(code))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing)
    rc = main(["train", "--acts", str(data / "acts.npy"), "--out", str(out), "--tokens", "20000", *TRAIN])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1
    assert os.strerror(code) in err and str(out) in err
    assert "free space" in err if code == errno.ENOSPC else "writable file system" in err
    assert not list(out.glob(".*.tmp")) and not (out / "checkpoint.pt").exists()
    monkeypatch.setattr(torch, "save", real)
    args = ["train", "--acts", str(data / "acts.npy"), "--out", str(out), "--tokens", "20000", *TRAIN]
    assert main(args) == 0


def test_a_full_disk_while_saving_the_atlas_state_is_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    from helpers import write_corpus

    from saelab.sae.base import create
    from saelab.sae.config import SAEConfig

    sae = create(SAEConfig(architecture="topk", d_in=128, n_latents=256, k=8,
                           hook_name="blocks.0.hook_mlp_out", model_name="one-layer"))
    sae.init_weights(torch.Generator().manual_seed(0))
    sae.save(tmp_path / "sae")
    corpus = write_corpus(tmp_path / "corpus", n_docs=12, words=60)
    out = tmp_path / "one.atlas"
    args = ["atlas", str(tmp_path / "sae"), "--out", str(out), "--corpus", str(corpus),
            "--context-length", "64", "--heldout-fraction", "0.5", "--tokens", "512", "--eval-tokens", "0",
            "--no-progress"]
    real = torch.save

    def full(obj, f, *a, **kw):
        if ".partial" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "state.pt: No space left on device; free space and re-run" in err, err
    assert not out.exists() and not list(tmp_path.rglob(".state.pt.*"))
    monkeypatch.setattr(torch, "save", real)
    assert main(args) == 0 and out.is_file()
