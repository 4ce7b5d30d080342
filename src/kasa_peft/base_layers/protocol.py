"""The protocol every base-layer kind implements: what KaSA needs to know about a frozen layer it wraps.

A *kind* is a stateless object (one instance per kind, listed in :mod:`.registry`). Every method takes the layer
as its first argument, so one instance serves every layer of that kind. Shapes are always given as KaSA sees the
layer — the linear map ``y = W x`` with ``W`` of shape (out × in) — whatever layout the layer stores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn


class BaseLayerKind(ABC):
    """One kind of base layer (``nn.Linear``, ``Conv1D``, a bitsandbytes 4-bit Linear, …).

    Class attributes:

    ``name``           short identifier (``"linear"``, ``"bnb-4bit"``, …).
    ``description``    how error messages list this kind among the supported bases.
    ``quantized``      the stored weight is packed/quantised: read only, and merged only by replacing the layer with
                       a dequantised ``nn.Linear`` (``merge_and_unload(dtype=…)``).
    ``reads_a_copy``   :meth:`weight_matrix` builds a new dense tensor (dequantised, gathered) instead of returning a
                       view, so truncations read such layers one at a time to bound peak memory.
    ``fan_in_fan_out`` the layer stores its weight transposed (in × out), PEFT's ``fan_in_fan_out``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    quantized: ClassVar[bool] = False
    reads_a_copy: ClassVar[bool] = False
    fan_in_fan_out: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<base-layer kind {self.name}>"

    @abstractmethod
    def matches(self, layer: nn.Module) -> bool:
        """Whether ``layer`` is of this kind (the registry asks kinds in order; the first match wins)."""

    @abstractmethod
    def shape(self, layer: nn.Module) -> tuple[int, int]:
        """(out_features, in_features) of the layer's linear map."""

    @abstractmethod
    def weight_matrix(self, layer: nn.Module) -> torch.Tensor:
        """The weight as an (out × in) matrix: a view of the stored weight where the layout allows, else a copy."""

    @contextmanager
    def dense_weight(self, layer: nn.Module, dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
        """Yield the detached (out × in) weight cast to ``dtype``; valid inside the context only (copy what you keep)."""
        matrix = self.weight_matrix(layer).detach()
        yield matrix if dtype is None else matrix.to(dtype)

    def device(self, layer: nn.Module) -> torch.device:
        """Where the layer computes (new adapters are created there)."""
        return layer.weight.device

    def is_on_meta(self, layer: nn.Module) -> bool:
        """Whether the weight has no values yet (meta device), so nothing can be truncated or fingerprinted."""
        return self.device(layer).type == "meta"

    def adapter_dtype(self, layer: nn.Module) -> torch.dtype:
        """Adapters train in float32 on half-precision and quantised bases (as PEFT does); float64 keeps float64."""
        return torch.float64 if layer.weight.dtype == torch.float64 else torch.float32

    def can_merge(self, layer: nn.Module) -> bool:
        """Whether a delta can be added to the stored weight in place (not for packed quantised weights)."""
        return not self.quantized

    def weight_plus(self, layer: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        """``W + delta`` (``delta`` out × in) in the weight's stored layout and dtype, for :meth:`write_weight`."""
        raise NotImplementedError(f"{self.name} layers cannot be merged into.")

    def write_weight(self, layer: nn.Module, value: torch.Tensor) -> None:
        """Overwrite the stored weight in place with ``value`` (stored layout, as :meth:`weight_plus` returns it)."""
        raise NotImplementedError(f"{self.name} layers cannot be merged into.")
