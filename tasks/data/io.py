"""The one place that reads and writes artifacts: Parquet datasets, checkpoints, metrics JSON.

Every write is atomic (a temporary sibling, then ``os.replace``), so an interrupted stage never leaves a
half-written file that DVC could cache. Datasets follow DESIGN.md: a column ``x`` of fixed-size float32 lists,
an optional ``label`` column, and schema metadata (shape, source, split, seed, plus source parameters as JSON).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config.sections import ConfigError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(final: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it into place, on failure remove it. Temporary
    files of ``final`` left by a writer that was killed (SIGKILL runs no cleanup) are removed first: one stage
    writes a given output at a time (``stein run`` holds the project lock, DVC its own)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; artifacts are ordinary files
    try:
        yield tmp
        if directory and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Mapping[str, Any]) -> None:
    """Write ``obj`` as JSON. A non-finite number is an error naming its key: JSON has no NaN, and a metrics file
    must never carry one (``json.dumps`` would write a bare ``NaN`` that strict readers reject)."""
    bad = [k for k, v in obj.items() if isinstance(v, float) and not np.isfinite(v)]
    if bad:
        raise ValueError(f"refusing to write {path}: non-finite value for {', '.join(map(repr, bad))} "
                         f"({', '.join(f'{k}={obj[k]}' for k in bad)})")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_rows(path: str | Path, rows: list[Mapping[str, Any]]) -> None:
    """Rows of dicts as a CSV for ``dvc plots`` (columns: the union of their keys, in order of first appearance;
    ``step`` written as an integer), atomically."""
    import csv

    keys = list(dict.fromkeys(k for r in rows for k in r)) or ["step"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows({k: (int(v) if k == "step" else v) for k, v in r.items()} for r in rows)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    """MD5 of a file's bytes: the same hash DVC records for a file in dvc.lock."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- Parquet


def write_dataset(
    path: str | Path,
    x: np.ndarray,
    *,
    label: np.ndarray | None = None,
    shape: tuple[int, ...] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``x`` ``[n, d]`` as a Parquet file with a fixed-size-list float32 column ``x``.

    ``shape`` is the shape of one example (``(d,)`` for vectors, ``(C, H, W)`` for images); ``metadata``
    values are stored as JSON strings in the schema metadata under their keys.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be [n, d], got shape {x.shape}")
    bad = nonfinite_rows(x)
    if bad.size:
        raise ValueError(f"refusing to write {path}: {bad.size} of {len(x)} rows hold non-finite values "
                         f"(NaN or inf, in float32), the first at row {bad[0]}")
    n, d = x.shape
    shape = tuple(shape) if shape is not None else (d,)
    if int(np.prod(shape)) != d:
        raise ValueError(f"shape {shape} does not match feature dimension {d}")
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), type=pa.float32()), d)
    columns = {"x": col}
    if label is not None:
        columns["label"] = pa.array(np.asarray(label, dtype=np.int64))
    meta = {"shape": json.dumps(list(shape))}
    for k, v in (metadata or {}).items():
        meta[k] = json.dumps(v)
    table = pa.table(columns).replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``x`` ``[n, d]`` holding a NaN or an infinity."""
    return np.flatnonzero(~np.isfinite(x).all(axis=1))


class Dataset:
    """A dataset read back from Parquet: ``x`` ``[n, d]`` float32, optional ``label``, decoded metadata."""

    def __init__(self, x: np.ndarray, label: np.ndarray | None, metadata: dict[str, Any]):
        self.x, self.label, self.metadata = x, label, metadata

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.metadata.get("shape", [self.x.shape[1]]))

    def __len__(self) -> int:
        return self.x.shape[0]


def read_dataset(path: str | Path) -> Dataset:
    """Read a dataset written by :func:`write_dataset`; a missing or corrupt file raises ConfigError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, None, "input file not found (run the upstream stage first, e.g. `stein run`)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(path, None, f"not a readable Parquet file: {exc}") from exc
    if "x" not in table.column_names:
        raise ConfigError(path, "x", f"missing column 'x' (columns: {table.column_names})")
    col = table.column("x").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise ConfigError(path, "x", f"expected a fixed-size list of floats, got {col.type}")
    if col.null_count:
        raise ConfigError(path, "x", f"{col.null_count} of {len(col)} rows are null")
    d = col.type.list_size
    if d < 1 or len(col) == 0:
        raise ConfigError(path, "x", f"no data: {len(col)} rows of dimension {d}")
    if not (pa.types.is_floating(col.type.value_type) or pa.types.is_integer(col.type.value_type)):
        raise ConfigError(path, "x", f"expected a fixed-size list of floats, got {col.type}")
    x = np.array(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d)  # writable copy
    bad = nonfinite_rows(x)
    if bad.size:
        raise ConfigError(path, "x", f"{bad.size} of {len(x)} rows hold non-finite values (NaN or inf), the first "
                          f"at row {bad[0]}: clean the data or rerun the stage that wrote it")
    label = np.array(table.column("label").to_numpy()) if "label" in table.column_names else None  # writable copy
    raw = table.schema.metadata or {}
    metadata: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode()
        if key.startswith("ARROW:") or key == "pandas":
            continue
        try:
            metadata[key] = json.loads(v.decode())
        except json.JSONDecodeError:
            metadata[key] = v.decode()
    shape = metadata.get("shape", [d])
    if not (isinstance(shape, list) and all(isinstance(v, int) and v > 0 for v in shape) and int(np.prod(shape)) == d):
        raise ConfigError(path, "shape", f"schema metadata shape {shape!r} does not describe rows of {d} values")
    if label is not None and (label.ndim != 1 or not np.issubdtype(label.dtype, np.integer)):
        raise ConfigError(path, "label", f"expected integer class labels, got {table.column('label').type}")
    return Dataset(x, label, metadata)


# --------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, *, state_dict: Mapping[str, Any], model_args: Mapping[str, Any], **extra: Any) -> None:
    """A checkpoint carries what rebuilds it: the weights, the constructor arguments and extra plain data."""

    payload = {"state_dict": dict(state_dict), "model_args": dict(model_args), **extra}
    save_torch(path, payload)


def save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save`` atomically and byte-reproducibly: saved through a file object, the zip archive's record
    names do not carry the (random) temporary file name, so equal contents give equal bytes and DVC sees an
    unchanged output (and skips the stages downstream) when a rerun reproduces the same weights."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, None, "checkpoint not found (run the train stage first)")
    if not zipfile.is_zipfile(path):
        raise ConfigError(path, None, "not a PyTorch checkpoint (torch.save writes a zip archive; this file is not one)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # one line; torch adds paragraphs
        raise ConfigError(path, None, f"not a readable checkpoint: {first}") from exc
