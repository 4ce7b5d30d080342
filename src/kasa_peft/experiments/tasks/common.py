"""Shared pieces of the task loaders: the data root and one-line data errors."""

from __future__ import annotations

import os
from pathlib import Path


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and the fix in one line."""


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The explicit ``data_dir``, else ``$KASA_DATA_DIR``, else ``None`` (then loaders try the Hub)."""
    chosen = data_dir or os.environ.get("KASA_DATA_DIR")
    return Path(chosen) if chosen else None


def require_file(root: Path | None, relative: str, what: str) -> Path:
    if root is None:
        raise DataError(f"{what} needs local data: pass --data-dir (or set KASA_DATA_DIR) to a directory with {relative}")
    path = root / relative
    if not path.is_file():
        raise DataError(f"{what}: file not found: {path}; pass --data-dir pointing at a directory with {relative} (layout: shared/data/MANIFEST.md)")
    return path


def check_label(value, allowed, path: Path, line: int):
    if value not in allowed:
        raise DataError(f"{path}:{line}: label {value!r} is outside the task's label set {sorted(allowed)}")
    return value
