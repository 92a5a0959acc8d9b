"""Atomic files: every output (images, CSV, JSON, checkpoints, training states, feature caches) is written to a
temporary file next to its target and renamed onto it, so a killed process never leaves a partial file under
the real name, and readers never see one."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path`` for the block to write; rename it onto ``path`` when the
    block succeeds, remove it when it fails. For writers that take a file name (safetensors, torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Create ``path`` through ``write(binary_file)`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a UTF-8 text file (e.g. JSON) atomically."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_csv_atomic(rows, path: str | os.PathLike) -> Path:
    """Write a pandas DataFrame (no index) or an iterable of dicts (columns in order of first appearance) as CSV,
    atomically."""
    if hasattr(rows, "to_csv"):
        return atomic_write(path, lambda f: rows.to_csv(f, index=False))
    rows = list(rows)
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def write(f: BinaryIO) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        text.flush()
        text.detach()  # leave closing the binary file to atomic_write

    return atomic_write(path, write)
