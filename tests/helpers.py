"""Shared test helpers: running the CLI and checking its one-line errors; tiny SAEs with
known behaviour; small corpora."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from saelab.sae.base import SAE, create
from saelab.sae.config import SAEConfig


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "saelab", *args], capture_output=True, text=True,
                          **kwargs)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"


def identity_sae(d_in: int, hook: str | None = None, zero: bool = False) -> SAE:
    """A ReLU SAE with 2*d_in latents that reconstructs exactly: z = relu([x, -x]),
    x̂ = z[:d] - z[d:]. With ``zero`` its decoder is zero, so x̂ = 0."""
    sae = create(SAEConfig(architecture="relu", d_in=d_in, n_latents=2 * d_in, hook_name=hook))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.zeros(2 * d_in, d_in) if zero else torch.cat([eye, -eye], dim=0))
    return sae


WORDS = (
    "the", "model", "reads", "a", "sentence", "and", "writes", "its", "features", "into", "the",
    "residual", "stream", "while", "sparse", "autoencoders", "take", "those", "features", "out",
    "of", "superposition", "one", "latent", "at", "a", "time", "python", "code", "defines",
    "functions", "classes", "and", "modules", "that", "import", "each", "other",
)


def write_corpus(folder: Path, n_docs: int = 40, words: int = 120, seed: int = 0) -> Path:
    """A folder of small English-like text files."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        idx = torch.randint(len(WORDS), (words,), generator=g).tolist()
        text = " ".join(WORDS[j] for j in idx)
        (folder / f"doc_{i:03d}.txt").write_text(f"Document {i}. {text.capitalize()}.\n")
    return folder


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free loopback port in a thread; yields its URL."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the viewer did not start"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's headless Chromium driven by Playwright."""
    import pytest
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`make install` does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
