"""One way to reuse a finished stage and to resume a stopped one.

Every stage that writes something a user keeps (a harvest's store, a trained SAE, an LM,
an atlas, a study's measurements) describes the settings that decide its result as
:class:`Settings`: a flat mapping of the settings that matter, leaving out the ones that
may change without changing the result (the device, the progress bar, how often to
checkpoint). From them come

- a **fingerprint** (a digest of those settings), written with the result in the stage's
  **completion marker** once the result is complete on disk: ``<folder>/stage.json`` for
  a stage that makes a folder, ``<file>.stage.json`` beside a stage that makes one file.
  A second run with the same settings finds the marker, compares fingerprints and returns
  the recorded result without redoing (or even loading the model for) the work;
- the **differences** from the settings a stopped run recorded in its partial state (a
  checkpoint, a store manifest), so a resumed run either continues the same work or stops
  with an error that names each setting that changed.

The marker is written atomically and last, so a stage that was killed has none, and a
result whose marker names other settings is never taken for this one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.errors import InputError
from saelab.io import atomic_write_json

MARKER = "stage.json"
MARKER_KIND = "saelab-stage"


def flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dump as one level: {"sae": {"k": 4}} -> {"sae.k": 4}."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def file_identity(path: Path) -> dict[str, Any]:
    """What stands for a file's contents in a fingerprint: its resolved path, size and
    modification time (hashing gigabytes of weights on every run would cost more than the
    work it saves)."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass(frozen=True)
class Settings:
    """The settings that decide one stage's result."""

    stage: str
    values: dict[str, Any]

    @classmethod
    def of(cls, stage: str, values: Mapping[str, Any], free: Collection[str] = ()) -> Settings:
        """``values`` flattened (nested keys joined by dots), without the ``free`` keys:
        the settings that may change between runs without changing the result."""
        kept = {k: v for k, v in flat(values).items() if k not in free}
        return cls(stage, kept)

    @property
    def fingerprint(self) -> str:
        blob = json.dumps([self.stage, self.values], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def changes(self, recorded: Settings | Mapping[str, Any]) -> list[str]:
        """Each setting that differs from ``recorded`` (the settings a run wrote down), as
        ``name (then -> now)``; a setting missing on one side counts as None there."""
        old = recorded.values if isinstance(recorded, Settings) else flat(recorded)
        keys = sorted(set(old) | set(self.values))
        return [f"{k} ({old.get(k)!r} -> {self.values.get(k)!r})" for k in keys
                if _norm(old.get(k)) != _norm(self.values.get(k))]

    def require_same(self, recorded: Settings | Mapping[str, Any], where: Path | str,
                     fix: str = "use another --out, or delete that folder to start over") -> None:
        """Raise, naming each changed setting, unless ``recorded`` are these settings."""
        changed = self.changes(recorded)
        if changed:
            raise InputError(f"{where} holds a {self.stage} with other settings: "
                              f"{', '.join(changed)}; {fix}")


def _norm(v: Any) -> Any:
    """JSON round-trip, so a tuple equals the list a file gave back."""
    return json.loads(json.dumps(v, default=str))


def marker_path(out: Path) -> Path:
    """Where the completion marker of the result at ``out`` lives."""
    out = Path(out)
    return out / MARKER if out.is_dir() else out.with_name(out.name + "." + MARKER)


def read_marker(out: Path) -> dict[str, Any] | None:
    path = marker_path(out)
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) and marker.get("kind") == MARKER_KIND else None


def finished(out: Path, settings: Settings) -> dict[str, Any] | None:
    """The recorded result of the finished stage at ``out`` if it was made with
    ``settings``; None if there is none, or it was made with other settings."""
    out = Path(out)
    if not out.exists():
        return None
    marker = read_marker(out)
    if marker is None or marker.get("stage") != settings.stage \
            or marker.get("fingerprint") != settings.fingerprint:
        return None
    result = marker.get("result")
    return result if isinstance(result, dict) else {}


def recorded_settings(out: Path) -> dict[str, Any] | None:
    """The settings the finished stage at ``out`` recorded (for naming what changed)."""
    marker = read_marker(out)
    return marker.get("settings") if marker else None


def mark_finished(out: Path, settings: Settings, result: Mapping[str, Any] | None = None,
                  seconds: float | None = None) -> dict[str, Any]:
    """Write the completion marker of the result at ``out`` (after the result is complete)."""
    from saelab import __version__

    marker = {"kind": MARKER_KIND, "stage": settings.stage, "fingerprint": settings.fingerprint,
              "settings": settings.values, "result": dict(result or {}),
              "seconds": None if seconds is None else round(seconds, 2),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "saelab_version": __version__}
    atomic_write_json(marker_path(out), marker)
    return marker["result"]


def clear(out: Path) -> None:
    """Forget that the result at ``out`` is finished (before changing it in place)."""
    if Path(out).exists():
        marker_path(Path(out)).unlink(missing_ok=True)


__all__ = ["MARKER", "Settings", "clear", "file_identity", "finished", "flat", "mark_finished",
           "marker_path", "read_marker", "recorded_settings"]


def json_result(out: Path, settings: Settings,
                compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The figures a stage writes as one JSON file ``out``: read back when the stage finished
    with ``settings`` (and the file is still readable), else ``compute()``d, written and marked.
    Returns (figures, reused)."""
    out = Path(out)
    if finished(out, settings) is not None:
        try:
            return json.loads(out.read_text(encoding="utf-8")), True
        except (OSError, json.JSONDecodeError):
            pass  # the figures were removed or damaged since: measure again
    clear(out)
    figures = compute()
    atomic_write_json(out, figures)
    mark_finished(out, settings, {"figures": str(out)})
    return figures, False
