"""A command's output: checked before the work starts, and held by one process at a time.

Every command that writes something a user keeps (a store, an SAE folder, a sweep, an atlas,
a study, an LM, the demo) runs inside :func:`claim`, which

- refuses an output of the wrong kind at once (``--out`` naming a file where a folder goes,
  or a folder where an atlas file goes), before any model is loaded or step is taken;
- proves the place is writable by creating the lock file, so a read-only or missing
  location fails in the first second, not after the last training step;
- takes an exclusive ``flock`` on that lock file (``OUT/.saelab.lock`` for a folder,
  ``.NAME.lock`` beside a file). A second process on the same output stops at once with one
  line naming the holder's command and PID. The kernel drops the lock when its holder dies,
  even by ``kill -9``, so a lock left by a killed process is simply taken over (the file
  stays; only the lock on it counts);
- removes the output folder again if the command created it and failed before writing
  anything into it (a harvest with a missing corpus leaves no empty ``--out``).

Locks are advisory and per host: two machines writing one folder over NFS are not covered.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from saelab.errors import InputError, SaelabError

LOCK = ".saelab.lock"
Kind = Literal["folder", "file"]


def lock_path(out: Path, kind: Kind) -> Path:
    return out / LOCK if kind == "folder" else out.with_name(f".{out.name}.lock")


def os_error(e: OSError, path: Path | str | None = None) -> SaelabError:
    """One line for a file-system error: the path and the system's text for the errno."""
    where = e.filename if e.filename is not None else path
    text = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    hint = {errno.ENOSPC: "; free space and re-run the same command to resume",
            errno.EDQUOT: "; free space and re-run the same command to resume",
            errno.EROFS: "; give an --out on a writable file system",
            errno.EACCES: "; give an --out you may write to",
            errno.EPERM: "; give an --out you may write to"}.get(e.errno or 0, "")
    return SaelabError(f"{where}: {text}{hint}" if where is not None else f"{text}{hint}")


def _check_kind(out: Path, kind: Kind) -> None:
    if kind == "folder" and out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, and this command writes a folder there; "
                         "give a folder path (new or one it made before)")
    if kind == "file" and out.is_dir():
        raise InputError(f"--out {out} is a folder, and this command writes one file there; "
                         f"give a file path, e.g. {out / 'sae.atlas'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise InputError(f"--out {out}: {out.parent} is a file, not a folder")


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text or "another saelab process"


@contextlib.contextmanager
def claim(out: str | Path, kind: Kind, command: str) -> Iterator[Path]:
    """Hold ``out`` for this process while the block runs (see the module's docstring)."""
    out = Path(out)
    _check_kind(out, kind)
    folder = out if kind == "folder" else out.parent
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    lock = lock_path(out, kind)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise os_error(e, out) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SaelabError(f"{out} is in use by {_holder(lock)}; wait for it to finish, or give "
                              "another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"saelab {command} (process {os.getpid()})\n".encode())
        ok = False
        try:
            yield out
            ok = True
        finally:
            if not ok:
                _remove_if_unused(made, lock)
    finally:
        os.close(fd)


def _remove_if_unused(made: list[Path], lock: Path) -> None:
    """Undo the folders this claim created, if the command left nothing in them."""
    if not made:
        return
    top = made[-1]
    leftover = [p for p in top.rglob("*") if p.is_file() and p != lock]
    if not leftover:
        shutil.rmtree(top, ignore_errors=True)


def held_by_this_rank() -> bool:
    """Under torchrun only rank 0 claims outputs (the others write nothing of their own)."""
    return os.environ.get("RANK", "0") == "0"


__all__ = ["LOCK", "claim", "held_by_this_rank", "lock_path", "os_error"]
