"""The ``saelab`` command: it works end to end, and bad input ends in one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli
from safetensors.torch import save_file

from saelab.cli import main
from saelab.data.toy import ToyDataConfig, make_toy_data


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> Path:
    data = make_toy_data(ToyDataConfig(d_in=16, n_features=32, avg_active=2, seed=5))
    x, _ = data.sample(4_000, seed=1)
    path = tmp_path_factory.mktemp("acts") / "acts.npy"
    np.save(path, x.numpy())
    return path


TRAIN = ["--n-latents", "64", "--k", "2", "--tokens", "20000", "--batch-size", "256",
         "--no-progress"]


def test_train_then_eval(acts, tmp_path, capsys) -> None:
    out = tmp_path / "sae"
    assert main(["train", "--acts", str(acts), "--out", str(out), *TRAIN]) == 0
    assert (out / "cfg.json").exists() and (out / "sae_weights.safetensors").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert {"step", "fvu", "l0", "dead_fraction", "tokens_per_s", "lr"} <= set(last)
    capsys.readouterr()
    assert main(["eval", str(out), "--acts", str(acts), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["fvu"] < 0.8 and metrics["l0"] <= 2 and metrics["rows"] == 4000
    assert main(["eval", str(out), "--acts", str(acts)]) == 0
    table = capsys.readouterr().out
    assert "FVU" in table and "dead latents" in table
    # Re-running a finished run does not retrain.
    before = (out / "sae_weights.safetensors").stat().st_mtime_ns
    assert main(["train", "--acts", str(acts), "--out", str(out), *TRAIN]) == 0
    assert (out / "sae_weights.safetensors").stat().st_mtime_ns == before


def test_train_accepts_safetensors(acts, tmp_path) -> None:
    st = tmp_path / "acts.safetensors"
    save_file({"activations": torch.from_numpy(np.load(acts))}, str(st))
    assert main(["train", "--acts", str(st), "--out", str(tmp_path / "s"), *TRAIN]) == 0


def test_help_lists_every_option() -> None:
    proc = run_cli("train", "--help")
    assert proc.returncode == 0
    for flag in ("--arch", "--n-latents", "--k", "--l1-coefficient", "--tokens", "--batch-size",
                 "--seed", "--out", "--drop-nonfinite", "--resample-every-steps"):
        assert flag in proc.stdout
    for cmd in ("eval", "toy"):
        assert run_cli(cmd, "--help").returncode == 0


def test_each_commands_options_come_from_its_config() -> None:
    """Every field of a command's config is a flag whose help gives the config's default, and
    the parsed flags build that config (so a default lives in one place)."""
    import argparse

    from saelab.cli import build_parser
    from saelab.config import BenchConfig, EvalConfig, ServeConfig, SplitConfig, SteerConfig
    from saelab.flags import from_args
    from saelab.studies.superposition import ToySweepConfig

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    commands = {"eval": (EvalConfig, ["SAE"]), "serve": (ServeConfig, ["A.atlas"]),
                "bench": (BenchConfig, ["SAE", "--out", "o"]),
                "steer": (SteerConfig, ["--sae", "s", "--feature", "1", "--ablate", "--prompt", "Hi"]),
                "split": (SplitConfig, ["small", "large"]), "toy": (ToySweepConfig, [])}
    for cmd, (cfg, needed) in commands.items():
        helps = {a.dest: a.help for a in subs[cmd]._actions}
        for name, field in cfg.model_fields.items():
            if name == "data":
                continue  # the toy data's own settings: the sweep's defaults
            assert name in helps, f"saelab {cmd} has no flag for {cfg.__name__}.{name}"
            default = field.get_default(call_default_factory=True)
            if default is not None and not field.is_required():
                assert f"[default: {default}]" in helps[name], (cmd, name, helps[name])
        args = parser.parse_args([cmd, *needed])
        assert from_args(cfg, args) == cfg.model_validate(
            {k: getattr(args, k) for k in cfg.model_fields if getattr(args, k, None) is not None})
    args = parser.parse_args(["serve", "A.atlas", "--port", "9001", "--no-live"])
    assert from_args(ServeConfig, args) == ServeConfig(port=9001, live=False)


def test_architecture_settings_are_checked_and_old_names_still_work(acts, tmp_path) -> None:
    """A setting the architecture does not have is refused with the architectures that have it;
    saelab 0.4's flag names (--jumprelu-bandwidth) still work."""
    proc = run_cli("train", "--acts", str(acts), "--out", str(tmp_path / "r"), "--arch", "relu", *TRAIN)
    assert_one_line_error(proc, "k is a setting of topk, batchtopk, matryoshka, transcoder, not of relu")
    out = tmp_path / "j"
    assert main(["train", "--acts", str(acts), "--out", str(out), "--arch", "jumprelu", "--n-latents", "32",
                 "--jumprelu-bandwidth", "0.2", "--tokens", "2048", "--batch-size", "256",
                 "--no-progress"]) == 0
    assert json.loads((out / "cfg.json").read_text())["saelab"]["sae"]["bandwidth"] == 0.2


def test_matrix_that_is_not_2d(tmp_path) -> None:
    bad = tmp_path / "3d.npy"
    np.save(bad, np.zeros((4, 5, 6), dtype=np.float32))
    assert_one_line_error(run_cli("train", "--acts", str(bad), "--out", str(tmp_path / "o")),
                          "2-D", "(4, 5, 6)")


def test_nan_rows_are_counted_and_located_or_dropped(acts, tmp_path) -> None:
    x = np.load(acts)
    x[[3, 10, 11]] = np.nan
    x[20, 5] = np.inf
    bad = tmp_path / "nan.npy"
    np.save(bad, x)
    assert_one_line_error(run_cli("train", "--acts", str(bad), "--out", str(tmp_path / "o"), *TRAIN),
                          "4 of 4000 rows", "rows 3, 10, 11, 20", "--drop-nonfinite")
    ok = run_cli("train", "--acts", str(bad), "--out", str(tmp_path / "o2"), *TRAIN,
                 "--drop-nonfinite")
    assert ok.returncode == 0, ok.stderr


def test_empty_file(tmp_path) -> None:
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    assert_one_line_error(run_cli("train", "--acts", str(empty), "--out", str(tmp_path / "o")),
                          "empty")
    zero_rows = tmp_path / "zero.npy"
    np.save(zero_rows, np.zeros((0, 8), dtype=np.float32))
    assert_one_line_error(run_cli("train", "--acts", str(zero_rows), "--out", str(tmp_path / "o")),
                          "empty")


def test_missing_and_unreadable_files(tmp_path) -> None:
    assert_one_line_error(run_cli("train", "--acts", str(tmp_path / "nope.npy"), "--out", "o"),
                          "no such file")
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy at all")
    assert_one_line_error(run_cli("train", "--acts", str(junk), "--out", "o"), "not a readable .npy")


def test_k_not_below_n_latents(acts, tmp_path) -> None:
    assert_one_line_error(
        run_cli("train", "--acts", str(acts), "--out", str(tmp_path / "o"), "--n-latents", "8",
                "--k", "8"),
        "k = 8 must be smaller than n_latents = 8")


def test_unknown_architecture(acts, tmp_path) -> None:
    proc = run_cli("train", "--acts", str(acts), "--out", str(tmp_path / "o"), "--arch", "sparse")
    assert_one_line_error(proc, "invalid choice: 'sparse'", "topk")


def test_bad_option_value_is_one_line(acts, tmp_path) -> None:
    proc = run_cli("train", "--acts", str(acts), "--out", str(tmp_path / "o"), "--batch-size", "0")
    assert_one_line_error(proc, "batch-size", "greater than 0")


def test_eval_width_mismatch(acts, tmp_path) -> None:
    out = tmp_path / "sae"
    assert main(["train", "--acts", str(acts), "--out", str(out), *TRAIN]) == 0
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((10, 17), dtype=np.float32))
    assert_one_line_error(run_cli("eval", str(out), "--acts", str(wide)), "width 17", "d_in = 16")
    assert_one_line_error(run_cli("eval", str(tmp_path), "--acts", str(acts)),
                          "is not an SAE folder", "pass one of them (sae)")
