"""The ordered list of base-layer kinds, and the one function that picks a layer's kind."""

from __future__ import annotations

from torch import nn

from . import bnb, dense, zero3
from .protocol import BaseLayerKind
from .unsupported import REFUSED, refusal_reason

# Asked in this order; the first kind whose ``matches`` holds is the layer's kind. bitsandbytes layers subclass
# nn.Linear and some refused classes do too, so both come before the dense kinds. A layer REFUSED matches has no kind.
KINDS: tuple[BaseLayerKind, ...] = (
    bnb.LINEAR_4BIT,
    bnb.LINEAR_8BIT,
    REFUSED,
    dense.CONV1D,
    dense.LINEAR,
)


def _first_match(layer: nn.Module) -> BaseLayerKind | None:
    return next((kind for kind in KINDS if kind.matches(layer)), None)


def kind_of(layer: nn.Module) -> BaseLayerKind | None:
    """The kind KaSA wraps ``layer`` as (ZeRO-3 partitioned layers: their kind behind the gather), or None."""
    kind = _first_match(layer)
    if kind is None or kind is REFUSED:
        return None
    return zero3.Zero3Gathered(kind) if zero3.is_partitioned(layer) else kind


def unsupported_quantised_reason(layer: nn.Module) -> str | None:
    """A description of ``layer`` if it is a quantised linear layer KaSA cannot wrap, else None."""
    return refusal_reason(layer) if _first_match(layer) is REFUSED else None


def supported_descriptions() -> str:
    """The supported kinds as error messages list them: "A, B, C and D"."""
    names = [kind.description for kind in KINDS if kind is not REFUSED]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def require_kind(layer: nn.Module, name: str) -> BaseLayerKind:
    """``layer``'s kind; ``TypeError`` naming ``name`` and its type if KaSA cannot wrap it."""
    kind = kind_of(layer)
    if kind is not None:
        return kind
    reason = unsupported_quantised_reason(layer)
    if reason is not None:
        raise TypeError(
            f"Module {name!r} is a quantised layer of type {reason}, which KaSA cannot dequantise for its "
            f"truncation. Supported bases: {supported_descriptions()}. Load the model with bitsandbytes "
            "(BitsAndBytesConfig) or unquantised, or exclude this module from target_modules."
        )
    raise TypeError(
        f"Module {name!r} is a {type(layer).__name__}; KaSA wraps {supported_descriptions()} layers only. Narrow "
        "target_modules to linear layers."
    )
