"""Atomic file output: a stage killed mid-write never leaves a half-written file behind.

Every writer goes to a temporary file in the destination folder, fsyncs it and renames it over the
target (rename is atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "", previous: str | os.PathLike | None = None):
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically.

    With ``previous``, the file ``target`` held until now is first renamed to ``previous``: a kill at
    any moment leaves a complete ``target`` or a complete ``previous`` (or both) behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        if previous is not None and target.exists():
            os.replace(target, previous)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(target: str | os.PathLike, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def write_json(target: str | os.PathLike, data: Any) -> Path:
    return write_text(target, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as handle:
        return json.load(handle)


def write_csv(
    target: str | os.PathLike, rows: Sequence[Mapping[str, Any]], fieldnames: Iterable[str] | None = None
):
    """Write dict rows as CSV (the format DVC plots read)."""
    rows = list(rows)
    if fieldnames is None:
        fieldnames = list(rows[0].keys()) if rows else []
    with atomic_path(target) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(fieldnames))
            writer.writeheader()
            writer.writerows(rows)
    return Path(target)


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def torch_save(target: str | os.PathLike, obj: Any, previous: str | os.PathLike | None = None) -> Path:
    """``torch.save`` atomically; the same object gives the same bytes (no time stamps, no paths)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # to a path, torch names the archive's folder after the (temporary) file
    with atomic_path(target, previous=previous) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return Path(target)


def torch_load(source: str | os.PathLike | bytes) -> Any:
    """Load a file (or its bytes) written by ``torch_save``."""
    # Our own checkpoints hold plain containers, tensors and numpy/python RNG states.
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    return torch.load(source, map_location="cpu", weights_only=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
