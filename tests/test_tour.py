"""The README's tour runs as written: every command of its bash blocks, in order, in a fresh
folder, at small budgets.

The budgets are the only change: flags appended to a command (argparse keeps the last value)
cut its tokens, dictionary size, grid and generation to seconds; every other word is the
README's (the Python block of step 9 is not run here; tests/test_cli.py covers its calls). The one
command that cannot run on one machine (the two-node torchrun, whose rendezvous is HOST0)
is left out; `saelab serve` is started, asked for its meta and stopped. The two matrices the
tour calls your own (acts.npy, held_out.npy) are made first.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port

from saelab.data.toy import ToyDataConfig, make_toy_data

pytestmark = pytest.mark.slow
README = Path(__file__).parents[1] / "README.md"
BIN = Path(sys.executable).parent

# Flags appended to each command, by its first words.
BUDGETS = {
    ("saelab", "toy"): ["--tokens", "20000", "--train-rows", "20000", "--eval-rows", "2000",
                        "--ratios", "1", "--ks", "5", "--l1-coefficients", "2"],
    ("saelab", "harvest"): ["--tokens", "12000"],
    ("saelab", "train"): ["--tokens", "32768", "--batch-size", "1024", "--expansion-factor", "2"],
    ("saelab", "eval"): [],  # an --acts eval reads the whole (small) matrix; a splice: see below
    ("saelab", "atlas"): ["--tokens", "1024", "--eval-tokens", "256", "--cofire-tokens", "1024"],
    ("saelab", "sweep"): ["--grid-n-latents", "1152,2304", "--grid-k", "8,16", "--tokens", "4096",
                          "--batch-size", "1024"],
    ("saelab", "steer"): ["--max-new-tokens", "6"],
    ("torchrun",): ["--expansion-factor", "2", "--tokens", "4096", "--batch-size", "1024"],
}


def tour_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    tour = text[text.index("## A 5-minute tour"):]
    tour = tour[:tour.index("\n## ", 5)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", tour, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(shlex.split(line))
    return commands


def _budgeted(cmd: list[str]) -> list[str]:
    assert cmd[0].startswith(".venv/bin/"), cmd
    words = [Path(cmd[0]).name, *cmd[1:]]
    key = ("torchrun",) if words[0] == "torchrun" else tuple(words[:2])
    extra = [] if words[1:3] == ["atlas", "export-html"] else list(BUDGETS.get(key, []))
    if key == ("saelab", "eval") and "--acts" not in words:
        extra = ["--tokens", "256"]
    return [str(BIN / words[0]), *words[1:], *extra]


def test_the_tour_runs_as_written(tmp_path):
    commands = tour_commands()
    assert len(commands) >= 14, commands
    toy = make_toy_data(ToyDataConfig(d_in=512, n_features=2048, avg_active=8, seed=0))
    np.save(tmp_path / "acts.npy", toy.sample(8192, seed=1)[0].numpy())
    np.save(tmp_path / "held_out.npy", toy.sample(2048, seed=2)[0].numpy())
    ran = []
    for cmd in commands:
        if "HOST0:29500" in " ".join(cmd):
            continue  # two machines
        argv = _budgeted(cmd)
        if cmd[1] == "serve":
            port = free_port()
            proc = subprocess.Popen([*argv, "--port", str(port), "--no-live"], cwd=tmp_path,
                                    stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.time() + 120
                while True:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/meta", timeout=5) as r:
                            assert json.load(r)["n_features"] > 0
                            break
                    except OSError:
                        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
                        time.sleep(0.5)
            finally:
                proc.terminate()
                proc.wait(30)
            ran.append(cmd[:2])
            continue
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{shlex.join(cmd)}\n{r.stderr[-3000:]}"
        ran.append(cmd[:2])
    assert (tmp_path / "runs/sweep/sweep.csv").is_file() and (tmp_path / "runs/site/index.html").is_file()
    assert (tmp_path / "runs/big-sae/sae_weights.safetensors").is_file()
    assert len(ran) == len(commands) - 1
