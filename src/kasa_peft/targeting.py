"""Which modules of a model an adapter targets, validated before any weight is touched."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .config import KasaConfig
from .base_layers import is_supported, require_supported, unsupported_quantised_reason
from .layer import KasaLayer, ModulesToSaveWrapper

# Task heads are newly initialised and tiny (often out = num_labels): "all-linear" leaves them out, as PEFT does for
# its task types; train them with modules_to_save instead.
_HEAD_NAMES = ("classifier", "score", "qa_outputs", "lm_head")

# Sub-module names that belong to our own wrappers and must never be targeted themselves.
_WRAPPER_CHILDREN = ("base_layer", "kasa_adapters", "original_module", "copies")


def _is_wrapper_internal(name: str) -> bool:
    return any(part in _WRAPPER_CHILDREN for part in name.split("."))


def name_matches(name: str, patterns: list[str] | str | None) -> bool:
    """PEFT's rule: a list matches a module path exactly or as a dotted suffix; a string is a full-match regex."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_layer_names(model: nn.Module) -> set[str]:
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is None:
        return set()
    return {name for name, module in model.named_modules() if module is output or getattr(module, "base_layer", None) is output}


def _is_linear_like(module: nn.Module) -> bool:
    # Quantised layers of other libraries count too, so that "all-linear" reports them instead of skipping them.
    return isinstance(module, KasaLayer) or is_supported(module) or unsupported_quantised_reason(module) is not None


def find_target_modules(model: nn.Module, config: KasaConfig) -> list[str]:
    """Module paths ``config`` targets in ``model``, in model order.

    Raises ``ValueError`` if nothing matches and ``TypeError`` if a match is not a Linear/Conv1D, naming the module
    and its type, so that a bad config fails before any weight is read or changed.
    """
    candidates = [(name, module) for name, module in model.named_modules() if name and not _is_wrapper_internal(name)]
    # A module inside a modules_to_save module is trained in full and copied per adapter; an adapter on it as well
    # would exist twice (original and copy), count twice in the regulariser, and not save.
    saved = find_modules_to_save(model, config.modules_to_save)
    if config.target_modules == "all-linear":
        excluded = _output_layer_names(model)
        matched = [
            (name, module)
            for name, module in candidates
            if _is_linear_like(module)
            and name not in excluded
            and _enclosing(name, saved) is None
            and not any(part in _HEAD_NAMES for part in name.split("."))
        ]
    else:
        matched = [(name, module) for name, module in candidates if name_matches(name, config.target_modules)]
    matched = [(name, module) for name, module in matched if not name_matches(name, config.exclude_modules)]
    # A ModulesToSaveWrapper is matched by its own path; its internals were filtered out above.
    matched = [(name, module) for name, module in matched if not isinstance(module, ModulesToSaveWrapper)]
    for name, _ in matched:
        enclosing = _enclosing(name, saved)
        if enclosing is not None:
            raise ValueError(
                f"target_modules matched {name!r}, which lies inside the modules_to_save module {enclosing!r} "
                "(trained in full, so it cannot also get an adapter). Add it to exclude_modules, or drop "
                f"{enclosing!r} from modules_to_save."
            )
    if not matched:
        examples = [name for name, module in candidates if _is_linear_like(module)][:12]
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}. "
            f"Linear/Conv1D modules here include: {examples}. Fix target_modules (names match exactly or as a "
            f"dotted suffix; a string is a regex), or use 'all-linear'."
        )
    for name, module in matched:
        if unsupported_quantised_reason(module) is not None:
            require_supported(module, name)  # raises, naming the quantised layer type
    unsupported = [(name, type(module).__name__) for name, module in matched if not _is_linear_like(module)]
    if unsupported:
        listing = ", ".join(f"{name} ({kind})" for name, kind in unsupported[:8])
        raise TypeError(
            f"KaSA supports torch.nn.Linear and transformers Conv1D layers only; target_modules matched "
            f"unsupported modules: {listing}. Narrow target_modules to linear layers."
        )
    return [name for name, _ in matched]


def _enclosing(name: str, paths: list[str]) -> str | None:
    """The path in ``paths`` that is ``name`` or one of its ancestors, else None."""
    return next((path for path in paths if name == path or name.startswith(path + ".")), None)


def find_modules_to_save(model: nn.Module, patterns: Iterable[str] | None) -> list[str]:
    """Paths of modules matching ``modules_to_save`` (outermost matches only); error if a pattern matches nothing."""
    if not patterns:
        return []
    patterns = list(patterns)
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or _is_wrapper_internal(name) or any(name.startswith(f + ".") for f in found):
            continue
        if name_matches(name, patterns):
            found.append(name)
    missing = [p for p in patterns if not any(name_matches(n, [p]) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save entries {missing} match no module of {type(model).__name__}.")
    for name in found:
        adapted = [sub for sub, module in model.get_submodule(name).named_modules() if isinstance(module, KasaLayer)]
        if adapted:
            raise ValueError(
                f"modules_to_save entry {name!r} contains layers that already carry adapters ({name}.{adapted[0]}); "
                "a module cannot be both trained in full and adapted. Drop it from modules_to_save."
            )
    return found


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
