"""Shared pieces of the task loaders: the data root and one-line data errors."""

from __future__ import annotations

import os
import random
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


#: Seed of every data subset (budget caps): fixed, so that all methods and seeds of a comparison see the same examples.
SUBSET_SEED = 0


def cap_items(items: list, limit: int | None) -> list:
    """At most ``limit`` of ``items``: a seeded random sample (:data:`SUBSET_SEED`) kept in file order.

    A head slice would be biased where files are grouped (CoLA train is ordered by source, its dev file is in-domain
    then out-of-domain); the fixed seed keeps the subset identical across methods and run seeds.
    """
    if not limit or limit >= len(items):
        return list(items)
    if limit < 0:
        raise DataError(f"a limit on examples must be positive, got {limit}")
    chosen = sorted(random.Random(SUBSET_SEED).sample(range(len(items)), limit))
    return [items[i] for i in chosen]
