"""Task families (one :class:`~.protocol.TaskFamily` object each) and their loaders.

``FAMILY_MODULES`` lists the modules that define a family as ``FAMILY``; adding a family means adding its module
here. ``family_of(task)`` is what the runner, ``kasa eval`` and the presets use.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

from .protocol import TaskFamily

FAMILY_MODULES = ("glue_family", "e2e_family", "commonsense_family", "instruction_family")


@lru_cache(maxsize=1)
def families() -> dict[str, TaskFamily]:
    """``{family name: family}`` in :data:`FAMILY_MODULES` order."""
    found: dict[str, TaskFamily] = {}
    for module in FAMILY_MODULES:
        family = importlib.import_module(f"{__name__}.{module}").FAMILY
        found[family.name] = family
    return found


def task_families() -> dict[str, str]:
    """``{task name: family name}`` for every ``--task`` value."""
    return {task: family.name for family in families().values() for task in family.tasks}


def family_of(task: str) -> TaskFamily:
    for family in families().values():
        if task in family.tasks:
            return family
    raise ValueError(f"Unknown task {task!r}; choose from {', '.join(task_families())}.")
