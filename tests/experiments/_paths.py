"""Where the offline data live for the tests: the first ``shared/data`` above this file (checkout or worktree)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve()
DATA = next((p / "shared" / "data" for p in _HERE.parents if (p / "shared" / "data").is_dir()),
            _HERE.parents[2].parent / "shared" / "data")
