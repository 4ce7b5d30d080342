"""Named presets (``--preset quick|paper``): resolution into RunConfig values, and what a run changed of its preset.

The values live with their task family (``TaskFamily.PRESETS``, each number with its source); this module only
looks them up, lists the valid names when one does not exist, and describes budget caps for the reports.
Order of precedence when a run is configured: RunConfig defaults < preset < config file < command-line flags.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .tasks import families, family_of

if TYPE_CHECKING:  # pragma: no cover
    from .runconfig import RunConfig

DEFAULT_PRESET = "quick"
#: Fields that shrink a run (a budget cap), as opposed to changing its protocol.
CAP_FIELDS = ("train_limit", "eval_limit", "max_steps", "epochs")


class PresetError(ValueError):
    """An unknown preset, or one that does not exist for the run's task."""


def all_preset_names() -> list[str]:
    return sorted({name for family in families().values() for name in family.PRESETS})


def presets_for(task: str) -> list[str]:
    """The presets that exist for ``task``."""
    family = family_of(task)
    return sorted(name for name, table in family.PRESETS.items() if task in table or "*" in table)


def resolve_preset(task: str, name: str | None) -> dict[str, Any]:
    """The RunConfig values of preset ``name`` for ``task`` (``None`` = :data:`DEFAULT_PRESET`)."""
    name = name or DEFAULT_PRESET
    family = family_of(task)
    if name not in all_preset_names():
        raise PresetError(f"Unknown preset {name!r}; valid presets: {', '.join(all_preset_names())}.")
    table = family.PRESETS.get(name, {})
    if task not in table and "*" not in table:
        raise PresetError(f"Preset {name!r} does not exist for task {task!r}; valid presets for it: "
                          f"{', '.join(presets_for(task))}.")
    return {**table.get("*", {}), **table.get(task, {})}


def deviations(config: "RunConfig") -> dict[str, dict[str, Any]]:
    """``{field: {"preset": value, "run": value}}`` for every preset value the run does not use."""
    preset = resolve_preset(config.task, config.preset)
    record = config.to_dict()
    return {key: {"preset": value, "run": record[key]} for key, value in preset.items() if record.get(key) != value}


def budget_record(config: "RunConfig", train_examples: int, optimizer_steps: int) -> dict[str, Any]:
    """What ``result.json`` records about the run's size against its preset."""
    preset = resolve_preset(config.task, config.preset)
    changed = deviations(config)
    return {
        "preset": config.preset or DEFAULT_PRESET,
        "max_train_examples": config.train_limit,
        "max_eval_examples": config.eval_limit,
        "max_steps": config.max_steps if config.max_steps and config.max_steps > 0 else None,
        "epochs": config.epochs,
        "preset_epochs": preset.get("epochs"),
        "train_examples": train_examples,
        "optimizer_steps": optimizer_steps,
        "changed_from_preset": sorted(key for key in changed if key not in CAP_FIELDS),
    }


def budget_text(budget: dict | None) -> str:
    """One short line for report tables: preset and every cap, e.g. ``paper · ≤2000 train · 3/100 ep · ≤400 steps``."""
    if not budget:
        return "–"
    parts = [str(budget.get("preset") or DEFAULT_PRESET)]
    if budget.get("max_train_examples"):
        parts.append(f"≤{budget['max_train_examples']} train")
    if budget.get("max_eval_examples"):
        parts.append(f"≤{budget['max_eval_examples']} eval")
    epochs, preset_epochs = budget.get("epochs"), budget.get("preset_epochs")
    if preset_epochs is not None and epochs is not None and epochs != preset_epochs:
        parts.append(f"{epochs:g}/{preset_epochs:g} ep")
    elif epochs is not None and preset_epochs is None:
        parts.append(f"{epochs:g} ep")
    if budget.get("max_steps"):
        parts.append(f"≤{budget['max_steps']} steps")
    if budget.get("changed_from_preset"):
        parts.append("changed: " + ",".join(budget["changed_from_preset"]))
    return " · ".join(parts)
