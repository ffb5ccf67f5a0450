"""The sharded on-disk activation store.

A store is a folder::

    manifest.json        model, hook, d_in, dtype, context length, corpus, token count,
                         and the list of complete shards (file, rows, sha256, windows read)
    shard_00000.npy      [rows, d_in] float16 / float32 (bfloat16 is kept as uint16 bits)
    shard_00001.npy      ...

Shards are written to a temporary file, synced and renamed; only then is the manifest
rewritten (atomically) to list them. A shard the manifest does not list is never read,
so a harvest killed at any moment (or a disk that fills) leaves a store that is valid up
to its last complete shard and resumes from there.

:class:`ActivationStore` reads a store as an :class:`~saelab.activations.source.ActivationSource`:
shards are memory-mapped; batches are shuffled across shards through a bounded buffer
(random chunks of random shards, shuffled together), so memory is set by the buffer, not
the store; every shard's sha256 is checked the first time it is read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.activations.source import rebatch
from saelab.errors import InputError, SaelabError
from saelab.io import atomic_write, atomic_write_json

MANIFEST = "manifest.json"
STORE_FORMAT_VERSION = 1
STORE_KIND = "saelab.activation_store"
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHUNK_ROWS = 2048
DEFAULT_BUFFER_ROWS = 1 << 17


def is_store(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.npy"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _to_numpy(rows: Tensor, dtype: str) -> np.ndarray:
    rows = rows.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        return rows.view(torch.int16).numpy().view(np.uint16)
    return rows.numpy()


def _to_float32(arr: np.ndarray, dtype: str) -> Tensor:
    """Copy rows out of a (read-only, memory-mapped) shard as float32."""
    if dtype == "bfloat16":
        bits = np.array(arr, dtype=np.uint16).astype(np.uint32) << 16
        return torch.from_numpy(bits.view(np.float32))
    return torch.from_numpy(np.asarray(arr, dtype=np.float32).copy() if arr.dtype == np.float32
                            else arr.astype(np.float32))


# ---------------------------------------------------------------------------- writing
class StoreWriter:
    """Appends complete shards to a store and keeps its manifest in step."""

    def __init__(self, path: str | Path, meta: dict[str, Any], dtype: str = "float16") -> None:
        if dtype not in DTYPES:
            raise InputError(f"store dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        if is_store(self.path):
            self.manifest = read_manifest(self.path)
        else:
            self.manifest = {"kind": STORE_KIND, "format_version": STORE_FORMAT_VERSION, **meta,
                             "dtype": dtype, "token_count": 0, "complete": False, "shards": []}
        for tmp in self.path.glob(".shard_*.tmp"):
            tmp.unlink()  # left by a killed harvest; never listed

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    def truncate(self, n_shards: int) -> None:
        """Forget shards after the first ``n_shards`` (to line up several hooks' stores)."""
        for s in self.shards[n_shards:]:
            (self.path / s["file"]).unlink(missing_ok=True)
        self.manifest["shards"] = self.shards[:n_shards]
        self.manifest["token_count"] = sum(s["rows"] for s in self.shards)
        self.manifest["complete"] = False
        self._write_manifest()

    def write_shard(self, rows: Tensor, windows_end: int) -> None:
        """Write one shard; it is listed in the manifest only once it is complete on disk."""
        arr = _to_numpy(rows, self.dtype)
        name = shard_name(len(self.shards))
        target = self.path / name
        digest: list[str] = []

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
            digest.append(sha256_file(tmp))

        try:
            atomic_write(target, write)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise SaelabError(
                    f"disk full while writing {target}; the store keeps its {len(self.shards)} "
                    "complete shard(s). Free space and re-run the same command to resume"
                ) from None
            raise SaelabError(f"cannot write {target}: {e.strerror or e}") from None
        self.shards.append({"file": name, "rows": int(arr.shape[0]), "sha256": digest[0],
                            "windows_end": int(windows_end)})
        self.manifest["token_count"] += int(arr.shape[0])
        self._write_manifest()

    def finish(self, extra: dict[str, Any] | None = None) -> None:
        self.manifest["complete"] = True
        if extra:
            self.manifest.update(extra)
        self._write_manifest()

    def _write_manifest(self) -> None:
        try:
            atomic_write_json(self.path / MANIFEST, self.manifest)
        except OSError as e:
            raise SaelabError(f"cannot write {self.path / MANIFEST}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------- reading
REQUIRED = ("kind", "format_version", "d_in", "dtype", "shards", "token_count")


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: not an activation store (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{file}: not valid JSON ({e})") from None
    missing = [k for k in REQUIRED if k not in manifest] if isinstance(manifest, dict) else list(REQUIRED)
    if missing:
        raise InputError(f"{file}: not a saelab store manifest (missing {', '.join(missing)})")
    if manifest["kind"] != STORE_KIND:
        raise InputError(f"{file}: kind is {manifest['kind']!r}, expected {STORE_KIND!r}")
    if manifest["format_version"] > STORE_FORMAT_VERSION:
        raise InputError(f"{file}: store format {manifest['format_version']} is newer than this saelab "
                         f"reads ({STORE_FORMAT_VERSION}); upgrade saelab")
    if manifest["dtype"] not in DTYPES:
        raise InputError(f"{file}: unknown dtype {manifest['dtype']!r}")
    return manifest


def damaged_shard(path: Path, progress: bool = False) -> tuple[int, str] | None:
    """The first shard the manifest lists that is missing or whose bytes differ from the
    sha256 it recorded, with what is wrong; None if every shard is intact."""
    shards = read_manifest(path)["shards"]
    from tqdm.auto import tqdm

    for i, s in enumerate(tqdm(shards, desc=f"verify {path.name}", unit="shard", leave=False,
                               disable=not progress or not shards)):
        file = path / s["file"]
        if not file.is_file():
            return i, f"{s['file']} is missing"
        if sha256_file(file) != s["sha256"]:
            return i, f"{s['file']} is corrupted (sha256 differs from the manifest)"
    return None


@dataclass(frozen=True)
class _Chunk:
    shard: int
    start: int
    stop: int


class ActivationStore:
    """Reads a store; implements :class:`~saelab.activations.source.ActivationSource`. A store whose
    harvest stopped early is refused unless ``allow_incomplete``."""

    def __init__(self, path: str | Path, buffer_rows: int = DEFAULT_BUFFER_ROWS,
                 chunk_rows: int = CHUNK_ROWS, verify: bool = True, prefetch: bool = True,
                 allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not allow_incomplete and not self.complete:
            asked = self.manifest.get("target_tokens")
            raise InputError(
                f"store {self.path} is incomplete: its harvest stopped at "
                f"{int(self.manifest['token_count']):,} rows"
                + (f" of the {int(asked):,} asked" if asked else "")
                + "; re-run the same harvest command to finish it, or pass --allow-incomplete to use "
                "the rows it has")
        self.d_in = int(self.manifest["d_in"])
        self.dtype = str(self.manifest["dtype"])
        self.hook_name: str | None = self.manifest.get("hook_name")
        self.model_name: str | None = self.manifest.get("model")
        # The hooks harvested in the same pass, row for row (a transcoder's pairs).
        self.aligned_hooks: list[str] | None = self.manifest.get("aligned_hooks")
        self.shards: list[dict[str, Any]] = list(self.manifest["shards"])
        if not self.shards:
            raise InputError(f"store {self.path} lists no shards (was its harvest stopped before the "
                             "first shard? re-run it)")
        self.counts = np.array([int(s["rows"]) for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.n_rows = int(self.offsets[-1])
        if self.n_rows != int(self.manifest["token_count"]):
            raise InputError(
                f"store {self.path}: the manifest's token_count {self.manifest['token_count']} disagrees "
                f"with its shards' rows ({self.n_rows})"
            )
        self.chunk_rows = int(chunk_rows)
        self.buffer_rows = max(self.chunk_rows, int(buffer_rows))
        self.verify = verify
        self.prefetch = prefetch
        self._verified: set[int] = set()
        self._lock = threading.Lock()
        for i in range(len(self.shards)):
            self._check_shape(i)

    @property
    def complete(self) -> bool:
        """Whether its harvest finished (stores written before the flag existed count as finished)."""
        return bool(self.manifest.get("complete", True))

    # ---------------------------------------------------------------- checks
    def _file(self, i: int) -> Path:
        return self.path / self.shards[i]["file"]

    def _check_shape(self, i: int) -> None:
        """Cheap: the shard exists and its header and size match the manifest."""
        file = self._file(i)
        if not file.is_file():
            raise InputError(f"store {self.path}: shard {file.name} is listed in the manifest but missing; "
                             "re-run the same harvest command to rewrite it")
        try:
            with open(file, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                header = f.tell()
        except (ValueError, OSError) as e:
            raise InputError(f"store {self.path}: shard {file.name} is corrupted ({e}); re-run the "
                             "same harvest command to rewrite it") from None
        want = (int(self.counts[i]), self.d_in)
        if tuple(shape) != want or dtype != np.dtype(DTYPES[self.dtype]):
            raise InputError(
                f"store {self.path}: shard {file.name} holds {tuple(shape)} {dtype} but the manifest "
                f"lists {want} {self.dtype}"
            )
        expected = header + want[0] * want[1] * np.dtype(DTYPES[self.dtype]).itemsize
        if file.stat().st_size != expected:
            raise InputError(
                f"store {self.path}: shard {file.name} is truncated or padded ({file.stat().st_size:,} "
                f"bytes, expected {expected:,}); re-run the same harvest command to rewrite it"
            )

    def verify_shard(self, i: int) -> None:
        with self._lock:
            if i in self._verified:
                return
        file = self._file(i)
        if sha256_file(file) != self.shards[i]["sha256"]:
            raise InputError(
                f"store {self.path}: shard {file.name} is corrupted (sha256 differs from the manifest); "
                "re-run the same harvest command to rewrite it"
            )
        with self._lock:
            self._verified.add(i)

    def verify_all(self) -> None:
        for i in range(len(self.shards)):
            self.verify_shard(i)

    # ---------------------------------------------------------------- reading rows
    def _read(self, i: int, start: int, stop: int) -> Tensor:
        if self.verify:
            self.verify_shard(i)
        arr = np.load(self._file(i), mmap_mode="r", allow_pickle=False)
        try:
            return _to_float32(arr[start:stop], self.dtype)
        finally:
            del arr  # unmap: resident pages stay bounded by what the buffer holds

    def _chunks(self) -> list[_Chunk]:
        out = []
        for i, n in enumerate(self.counts):
            out.extend(_Chunk(i, s, min(s + self.chunk_rows, int(n)))
                       for s in range(0, int(n), self.chunk_rows))
        return out

    def _groups(self, seed: int, epoch: int) -> list[list[_Chunk]]:
        """An epoch as groups of random chunks, each group at most ``buffer_rows`` rows."""
        chunks = self._chunks()
        order = np.random.default_rng([seed, epoch, 0x570]).permutation(len(chunks))
        per = max(1, self.buffer_rows // self.chunk_rows)
        return [[chunks[j] for j in order[g:g + per]] for g in range(0, len(order), per)]

    def _load_group(self, group: list[_Chunk], seed: int, epoch: int, g: int) -> Tensor:
        # Read in file order (sequential IO), then shuffle rows across the whole group.
        parts = [self._read(c.shard, c.start, c.stop)
                 for c in sorted(group, key=lambda c: (c.shard, c.start))]
        rows = torch.cat(parts)
        perm = torch.from_numpy(np.random.default_rng([seed, epoch, g]).permutation(rows.shape[0]))
        return rows[perm]

    def _group_stream(self, seed: int, start_row: int) -> Iterator[Tensor]:
        """Shuffled groups from the group holding ``start_row`` (of the endless sequence),
        with the first group trimmed so the stream begins exactly at ``start_row``."""
        epoch, skip = divmod(start_row, self.n_rows)
        groups = self._groups(seed, epoch)
        g = 0
        while skip >= sum(c.stop - c.start for c in groups[g]):
            skip -= sum(c.stop - c.start for c in groups[g])
            g += 1
        pool = ThreadPoolExecutor(max_workers=1) if self.prefetch else None

        def submit(ep: int, gi: int, grp: list[_Chunk]) -> Future[Tensor] | Tensor:
            return pool.submit(self._load_group, grp, seed, ep, gi) if pool \
                else self._load_group(grp, seed, ep, gi)

        def resolve(x: Future[Tensor] | Tensor) -> Tensor:
            return x.result() if isinstance(x, Future) else x

        try:
            pending = submit(epoch, g, groups[g])
            while True:
                nxt_g, nxt_epoch = g + 1, epoch
                if nxt_g == len(groups):
                    nxt_epoch, nxt_g = epoch + 1, 0
                    next_groups = self._groups(seed, nxt_epoch)
                else:
                    next_groups = groups
                current = resolve(pending)
                pending = submit(nxt_epoch, nxt_g, next_groups[nxt_g])
                yield current[skip:] if skip else current
                skip = 0
                g, epoch, groups = nxt_g, nxt_epoch, next_groups
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Tensor]:
        return rebatch(self._group_stream(seed, start_step * batch_size), batch_size)

    def sample(self, n: int, seed: int) -> Tensor:
        rng = np.random.default_rng([seed, 0x5A3])
        idx = np.sort(rng.choice(self.n_rows, size=min(n, self.n_rows), replace=False))
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        parts = []
        for i in np.unique(shard_of):
            local = idx[shard_of == i] - self.offsets[i]
            if self.verify:
                self.verify_shard(int(i))
            arr = np.load(self._file(int(i)), mmap_mode="r", allow_pickle=False)
            parts.append(_to_float32(arr[local], self.dtype))
            del arr
        return torch.cat(parts)

    def rows(self, batch_size: int, limit: int | None = None) -> Iterator[Tensor]:
        end = self.n_rows if limit is None else min(limit, self.n_rows)
        for start in range(0, end, batch_size):
            stop = min(start + batch_size, end)
            parts = []
            for i in range(len(self.shards)):
                lo, hi = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
                if lo < hi:
                    parts.append(self._read(i, int(lo - self.offsets[i]), int(hi - self.offsets[i])))
            yield torch.cat(parts)

    def describe(self) -> str:
        what = " ".join(str(x) for x in (self.model_name, self.hook_name) if x)
        return f"store {self.path} ({what + ', ' if what else ''}{self.n_rows:,} rows x {self.d_in}, " \
               f"{len(self.shards)} shards, {self.dtype})"


def open_store(path: str | Path, allow_incomplete: bool = False, **kwargs: Any) -> ActivationStore:
    """Open a store (one whose harvest stopped early only with ``allow_incomplete``); a folder of
    several hooks' stores names them in the error."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such activation store")
    if not is_store(path):
        subs = sorted(p.name for p in path.iterdir() if is_store(p)) if path.is_dir() else []
        if subs:
            raise InputError(f"{path} holds stores for several hooks ({', '.join(subs)}); pass one of "
                             f"them, e.g. {path / subs[0]}")
        raise InputError(f"{path}: not an activation store (no {MANIFEST})")
    return ActivationStore(path, allow_incomplete=allow_incomplete, **kwargs)
