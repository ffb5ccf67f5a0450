"""`saelab demo` end to end on SmolLM2 at a tiny size: every stage runs and reports its time,
Ctrl-C leaves nothing recorded half-done and the next run finishes, a further run reuses
every stage, and the viewer it starts serves the atlas it built."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port, run_cli

from saelab.activations.store import read_manifest

pytestmark = pytest.mark.slow
TINY = ["--corpus", "python-stdlib", "--context-length", "64", "--tokens", "30000", "--expansion-factor", "1",
        "--k", "8", "--eval-tokens", "256", "--atlas-tokens", "3000", "--device", "cpu"]


def _sigint_default() -> None:
    # A shell that starts jobs in the background (nohup, `&`) leaves SIGINT ignored, and an
    # ignored SIGINT is inherited; Ctrl-C must reach the demo as it does in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "saelab", "demo", *TINY, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_sigint_default)


def _wait_for(stream, needle: str, timeout: float = 300) -> str:
    """Read ``stream`` until ``needle`` appears (progress bars end lines with \\r, not \\n)."""
    seen = ""
    deadline = time.time() + timeout
    while time.time() < deadline:
        c = stream.read(1)
        if not c:
            break
        seen += c
        if seen.endswith(needle):
            return seen
    raise AssertionError(f"{needle!r} never appeared in:\n{seen}")


def test_demo_interrupted_then_finished_then_reused_then_served(tmp_path):
    out = tmp_path / "demo"
    # Ctrl-C while harvesting: exit 130, no stage recorded, no half shard in the manifest
    proc = _start(out, "--no-serve")
    _wait_for(proc.stderr, "harvest:")  # the harvest's progress bar
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / "demo.json").exists()
    for store in out.glob("store-*"):
        if (store / "manifest.json").exists():
            m = read_manifest(store)
            assert all((store / s["file"]).stat().st_size > 0 for s in m["shards"])

    # the next run finishes every stage and prints the summary
    done = run_cli("demo", *TINY, "--out", str(out), "--no-serve", timeout=900)
    assert done.returncode == 0, done.stderr
    table = done.stdout
    for stage in ("load model", "harvest", "train", "evaluate", "atlas", "total"):
        assert stage in table
    assert "30,000 activation rows" in table and "CE loss recovered" in table
    record = json.loads((out / "demo.json").read_text())
    assert set(record) == {"harvest", "train", "evaluate", "atlas"}
    recovered = record["evaluate"]["metrics"]["ce_recovered"]
    assert 0.3 < recovered <= 1.0  # a real (if tiny) SAE: far better than zero-ablating the stream
    atlas = next(out.glob("*.atlas"))

    # a further run reuses every stage (the model is not even loaded) and serves the viewer
    port = free_port()
    proc = _start(out, "--port", str(port))
    try:
        seen = _wait_for(proc.stderr, f"http://127.0.0.1:{port}/")
        assert seen.count("reusing") == 4 and "loading" not in seen
        meta = None
        deadline = time.time() + 120
        while meta is None and time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/meta", timeout=5) as r:
                    meta = json.load(r)
            except OSError:
                time.sleep(0.5)
        assert meta is not None, "the viewer did not answer"
        assert meta["n_features"] == 576 and meta["hook_name"] == "blocks.6.hook_resid_post"
        assert meta["metrics"]["ce_recovered"] == pytest.approx(recovered)
        assert meta["live"] and meta["steer"]
        assert Path(meta["sae"]["path"]).resolve() == Path(record["train"]["path"]).parent.resolve()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert atlas.exists()
