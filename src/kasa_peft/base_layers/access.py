"""What the rest of the library asks about a base layer, answered through the layer's kind (see :mod:`.registry`).

Nothing outside this package tests a layer's class: it calls these functions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..spectral import MinorComponents, truncate_many
from .registry import kind_of, require_kind


def is_supported(layer: nn.Module) -> bool:
    return kind_of(layer) is not None


def require_supported(layer: nn.Module, name: str) -> None:
    """Raise ``TypeError`` naming ``name`` and its type unless KaSA can wrap ``layer``."""
    require_kind(layer, name)


def is_quantized(layer: nn.Module) -> bool:
    kind = kind_of(layer)
    return kind is not None and kind.quantized


def can_merge_into(layer: nn.Module) -> bool:
    """Whether ``ΔW − W_minor`` can be added to the layer's stored weight (not for packed quantised weights)."""
    kind = kind_of(layer)
    return kind is not None and kind.can_merge(layer)


def fan_in_fan_out(layer: nn.Module) -> bool:
    """Whether the layer stores its weight transposed (in × out), as transformers' Conv1D does (PEFT's flag)."""
    return require_kind(layer, type(layer).__name__).fan_in_fan_out


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of any supported base layer, whatever its storage layout."""
    return require_kind(layer, type(layer).__name__).shape(layer)


def layer_device(layer: nn.Module) -> torch.device:
    """The device the layer computes on (where its adapters live)."""
    return require_kind(layer, type(layer).__name__).device(layer)


def default_adapter_dtype(layer: nn.Module) -> torch.dtype:
    """Adapters train in float32 on half-precision and quantised bases (as PEFT does); float64 bases keep float64."""
    return require_kind(layer, type(layer).__name__).adapter_dtype(layer)


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out × in) matrix: a view for Linear/Conv1D, a dequantised copy for bitsandbytes.

    Not for ZeRO-3 partitioned layers; read those through :func:`dense_weight`.
    """
    return require_kind(layer, type(layer).__name__).weight_matrix(layer)


@contextmanager
def dense_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """Yield the layer's (out × in) weight as a dense matrix (dequantised, gathered under ZeRO-3), cast to ``dtype``.

    Inside the context the tensor is valid; under ZeRO-3 it is released again on exit, so copy what you keep.
    """
    with require_kind(layer, type(layer).__name__).dense_weight(layer, dtype) as matrix:
        yield matrix


def weight_plus(layer: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """``W + delta`` (``delta`` out × in) in the layer's stored layout and dtype, rounded once; nothing is written."""
    return require_kind(layer, type(layer).__name__).weight_plus(layer, delta)


def write_weight(layer: nn.Module, value: torch.Tensor) -> None:
    """Overwrite the stored weight in place with ``value`` as :func:`weight_plus` returns it (tied weights stay tied)."""
    require_kind(layer, type(layer).__name__).write_weight(layer, value)


def add_to_weight(layer: nn.Module, delta: torch.Tensor) -> None:
    """``W ← W + delta`` in place (``delta`` out × in), rounded once into the weight's dtype."""
    write_weight(layer, weight_plus(layer, delta))


def is_on_meta(layer: nn.Module) -> bool:
    return require_kind(layer, type(layer).__name__).is_on_meta(layer)


def check_weight_readable(layer: nn.Module, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if the weight is on the meta device (nothing to truncate)."""
    if is_on_meta(layer):
        raise ValueError(
            f"Module {name!r} has its weight on the meta device, so its truncation cannot be computed. Load real "
            "weights first, or load a saved adapter with KasaModel.from_pretrained (it needs no SVD)."
        )


def layer_fingerprint(layer: nn.Module) -> torch.Tensor:
    """``checkpoint.weight_fingerprint`` of the layer's dense (dequantised, gathered) weight."""
    from ..checkpoint import weight_fingerprint

    with dense_weight(layer) as weight:
        return weight_fingerprint(weight)


def truncate_layers(layers: Mapping[str, nn.Module], r: int, method: str) -> list[MinorComponents]:
    """KaSA's minor components (float64) of each named base layer's dense weight, in ``layers`` order.

    Weights that are views (Linear/Conv1D) are batched by shape (see ``truncate_many``). Kinds that read a copy
    (quantised, ZeRO-3) are dequantised/gathered and truncated one at a time, so that at most one dense copy of a
    weight exists at once (a 4-bit 7B model dequantised all at once would not fit where it was loaded).
    """
    names = list(layers)
    results: dict[str, MinorComponents] = {}
    one_at_a_time = {n for n in names if require_kind(layers[n], n).reads_a_copy}
    direct = [n for n in names if n not in one_at_a_time]
    for name in names:
        check_weight_readable(layers[name], name)
    for name in names:
        if name not in one_at_a_time:
            continue
        with dense_weight(layers[name], torch.float64) as weight:
            results[name] = truncate_many([weight], r, method, names=[name])[0]
    direct_weights = [weight_matrix(layers[n]) for n in direct]
    # truncate_many checks finiteness with one fused reduction per batch and names the offending module.
    for name, minor in zip(direct, truncate_many(direct_weights, r, method, names=direct)):
        results[name] = minor
    return [results[name] for name in names]


def dequantized_linear(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain ``nn.Linear`` in ``dtype`` holding ``layer``'s dequantised weight and its bias (for merging)."""
    out_features, in_features = layer_shape(layer)
    with dense_weight(layer) as weight:
        dense = nn.Linear(in_features, out_features, bias=layer.bias is not None, device=weight.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(weight.to(dtype))
            if layer.bias is not None:
                dense.bias.copy_(layer.bias.detach().to(dtype))
    dense.requires_grad_(False)
    return dense
