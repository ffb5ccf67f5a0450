"""Where training rows come from.

The trainer reads activations through the :class:`ActivationSource` protocol only:
a deterministic, resumable stream of shuffled batches, random samples for
initialisation, and a sequential pass for evaluation. :class:`MatrixSource` serves an
in-memory tensor, a ``.npy`` file (memory-mapped) or a ``.safetensors`` matrix; the
sharded on-disk store implements the same protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from saelab.errors import InputError

_CHUNK = 65536


@runtime_checkable
class ActivationSource(Protocol):
    d_in: int
    n_rows: int

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Tensor]:
        """Endless shuffled [batch_size, d_in] float32 batches; batch i depends only on
        (seed, i), so a resumed run sees the same batches as one that never stopped."""
        ...

    def sample(self, n: int, seed: int) -> Tensor:
        """Up to ``n`` distinct random rows, for initialisation."""
        ...

    def rows(self, batch_size: int, limit: int | None = None) -> Iterator[Tensor]:
        """The rows in order, once, in batches (for evaluation)."""
        ...

    def describe(self) -> str: ...


def rebatch(groups: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Cut a stream of row groups into batches of exactly ``batch_size`` rows."""
    carry: Tensor | None = None
    for group in groups:
        rows = group if carry is None else torch.cat([carry, group])
        n_full = rows.shape[0] // batch_size
        for b in range(n_full):
            yield rows[b * batch_size:(b + 1) * batch_size]
        carry = rows[n_full * batch_size:]


class MatrixSource:
    """A 2-D activation matrix [rows, d_in] held in memory or memory-mapped."""

    def __init__(self, matrix: np.ndarray | Tensor, name: str = "tensor",
                 drop_nonfinite: bool = False) -> None:
        self.name = name
        if isinstance(matrix, Tensor):
            matrix = matrix.detach().cpu()
            if matrix.dtype == torch.bfloat16:
                matrix = matrix.float()
            matrix = matrix.numpy()
        if matrix.ndim != 2:
            raise InputError(
                f"{name}: activations must be a 2-D matrix [rows, d_in], got shape "
                f"{tuple(matrix.shape)}; reshape to (-1, d_in) first"
            )
        if matrix.shape[0] == 0 or matrix.shape[1] == 0:
            raise InputError(f"{name}: the activation matrix is empty (shape {tuple(matrix.shape)})")
        if not np.issubdtype(matrix.dtype, np.floating):
            raise InputError(f"{name}: activations must be floating point, got {matrix.dtype}")
        self.matrix = matrix
        self.d_in = int(matrix.shape[1])
        self.valid = self._finite_rows(drop_nonfinite)
        self.n_rows = int(matrix.shape[0] if self.valid is None else self.valid.shape[0])
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _finite_rows(self, drop: bool) -> np.ndarray | None:
        bad: list[np.ndarray] = []
        for start in range(0, self.matrix.shape[0], _CHUNK):
            chunk = np.asarray(self.matrix[start:start + _CHUNK])
            rows = np.nonzero(~np.isfinite(chunk).all(axis=1))[0]
            if rows.size:
                bad.append(rows + start)
        if not bad:
            return None
        bad_rows = np.concatenate(bad)
        if not drop:
            shown = ", ".join(str(int(r)) for r in bad_rows[:5])
            more = f" and {bad_rows.size - 5} more" if bad_rows.size > 5 else ""
            raise InputError(
                f"{self.name}: {bad_rows.size} of {self.matrix.shape[0]} rows contain NaN or "
                f"Inf (rows {shown}{more}); clean them or pass --drop-nonfinite to skip them"
            )
        keep = np.setdiff1d(np.arange(self.matrix.shape[0]), bad_rows)
        if keep.size == 0:
            raise InputError(f"{self.name}: every row contains NaN or Inf")
        return keep

    # ------------------------------------------------------------------ reading
    def _take(self, idx: np.ndarray) -> Tensor:
        if self.valid is not None:
            idx = self.valid[idx]
        order = np.argsort(idx, kind="stable")
        rows = np.asarray(self.matrix[idx[order]], dtype=np.float32)
        return torch.from_numpy(rows)

    def _epoch_perm(self, seed: int, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([seed, epoch])
            self._perm = rng.permutation(self.n_rows)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Tensor]:
        pos = start_step * batch_size
        while True:
            parts = []
            need = batch_size
            while need:
                epoch, offset = divmod(pos, self.n_rows)
                take = min(need, self.n_rows - offset)
                parts.append(self._epoch_perm(seed, epoch)[offset:offset + take])
                pos += take
                need -= take
            yield self._take(np.concatenate(parts))

    def sample(self, n: int, seed: int) -> Tensor:
        rng = np.random.default_rng([seed, 0x5A3])
        idx = rng.choice(self.n_rows, size=min(n, self.n_rows), replace=False)
        return self._take(idx)

    def rows(self, batch_size: int, limit: int | None = None) -> Iterator[Tensor]:
        end = self.n_rows if limit is None else min(limit, self.n_rows)
        for start in range(0, end, batch_size):
            yield self._take(np.arange(start, min(start + batch_size, end)))

    def describe(self) -> str:
        return f"{self.name} ({self.n_rows:,} rows x {self.d_in})"


class PairedSource:
    """Row-aligned (input, target) activations of two hook points, for a transcoder: the
    same rows, in the same order, of two sources of equal length. Batches, samples and
    passes yield ``(x, y)`` pairs; both sides are shuffled by the same permutation, which the
    two sources draw alike because it depends only on the seed and the row (and shard) counts.
    Two stores must come from one harvest (their manifests name each other's hook as aligned)."""

    def __init__(self, inputs: ActivationSource, targets: ActivationSource) -> None:
        if inputs.n_rows != targets.n_rows:
            raise InputError(f"the input ({inputs.describe()}) and target ({targets.describe()}) "
                             f"activations have {inputs.n_rows:,} and {targets.n_rows:,} rows; a transcoder "
                             "needs row-aligned pairs: harvest both hooks in one run (saelab harvest --hook "
                             "IN --hook OUT)")
        for side in (inputs, targets):
            if isinstance(side, MatrixSource) and side.valid is not None:
                raise InputError(f"{side.describe()}: dropping non-finite rows would misalign the pairs; "
                                 "clean the rows instead")
        aligned_in = getattr(inputs, "aligned_hooks", None)
        aligned_out = getattr(targets, "aligned_hooks", None)
        if aligned_in is not None or aligned_out is not None:
            hook_in, hook_out = getattr(inputs, "hook_name", None), getattr(targets, "hook_name", None)
            if not (aligned_in and hook_out in aligned_in and aligned_out and hook_in in aligned_out):
                raise InputError(f"{inputs.describe()} and {targets.describe()} were not harvested together; "
                                 "harvest both hooks in one run (saelab harvest --hook IN --hook OUT)")
            if list(getattr(inputs, "counts", [])) != list(getattr(targets, "counts", [])):
                raise InputError(f"{inputs.describe()} and {targets.describe()} have other shard sizes; "
                                 "re-run their harvest")
        self.inputs, self.targets = inputs, targets
        self.d_in, self.d_out, self.n_rows = inputs.d_in, targets.d_in, inputs.n_rows
        self.hook_name = getattr(inputs, "hook_name", None)
        self.hook_name_out = getattr(targets, "hook_name", None)
        self.model_name = getattr(inputs, "model_name", None)

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        return zip(self.inputs.batches(batch_size, seed, start_step),  # both endless
                   self.targets.batches(batch_size, seed, start_step), strict=False)

    def sample(self, n: int, seed: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self.inputs.sample(n, seed), self.targets.sample(n, seed)

    def rows(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        return zip(self.inputs.rows(batch_size, limit), self.targets.rows(batch_size, limit), strict=True)

    def describe(self) -> str:
        return f"pairs {self.inputs.describe()} -> {self.targets.describe()}"


def load_matrix(path: str | Path, drop_nonfinite: bool = False) -> MatrixSource:
    """Open a ``.npy`` or ``.safetensors`` activation matrix."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            matrix = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"{path}: not a readable .npy array ({e})") from None
    elif suffix == ".safetensors":
        matrix = _load_safetensors_matrix(path)
    else:
        raise InputError(f"{path}: unsupported activation file type {suffix!r}; use .npy or .safetensors")
    return MatrixSource(matrix, name=str(path), drop_nonfinite=drop_nonfinite)


def _load_safetensors_matrix(path: Path) -> Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if not keys:
                raise InputError(f"{path}: the safetensors file holds no tensors")
            if len(keys) == 1:
                key = keys[0]
            elif "activations" in keys:
                key = "activations"
            else:
                raise InputError(
                    f"{path} holds several tensors ({', '.join(keys[:6])}); name the activation "
                    "matrix 'activations'"
                )
            return f.get_tensor(key)
    except SafetensorError as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None


def open_pairs(inputs: ActivationSource | Tensor | np.ndarray | str | Path,
               targets: ActivationSource | Tensor | np.ndarray | str | Path,
               allow_incomplete: bool = False) -> PairedSource:
    """Row-aligned (input, target) activations, for a transcoder."""
    return PairedSource(open_source(inputs, allow_incomplete=allow_incomplete),
                        open_source(targets, allow_incomplete=allow_incomplete))


def open_source(data: ActivationSource | Tensor | np.ndarray | str | Path,
                drop_nonfinite: bool = False, allow_incomplete: bool = False) -> ActivationSource:
    """Turn any supported input into an :class:`ActivationSource` (a store whose harvest
    stopped early is refused unless ``allow_incomplete``)."""
    if isinstance(data, (Tensor, np.ndarray)):
        return MatrixSource(data, drop_nonfinite=drop_nonfinite)
    if isinstance(data, (str, Path)):
        if Path(data).is_dir():
            from saelab.activations.store import open_store

            return open_store(data, allow_incomplete=allow_incomplete)
        return load_matrix(data, drop_nonfinite=drop_nonfinite)
    if isinstance(data, (ActivationSource, PairedSource)):
        return data  # type: ignore[return-value]
    raise InputError(f"cannot read activations from a {type(data).__name__}")
