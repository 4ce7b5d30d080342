"""DeepSpeed ZeRO-3 as a wrapper around any other kind.

Under ZeRO-3 a layer's parameters are partitioned across ranks and each rank holds an empty placeholder. The
registry wraps the layer's own kind in :class:`Zero3Gathered`, which reads the dense weight inside
``deepspeed.zero.GatheredParameters`` (whole on every rank, released on exit) and otherwise defers to that kind.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn

from .protocol import BaseLayerKind


def is_partitioned(layer: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned the layer's own parameters (they carry a ``ds_id``)."""
    return any(hasattr(param, "ds_id") for param in layer.parameters(recurse=False))


class Zero3Gathered(BaseLayerKind):
    """``inner``'s behaviour, with the weight gathered for every dense read."""

    reads_a_copy: ClassVar[bool] = True

    def __init__(self, inner: BaseLayerKind) -> None:
        self.inner = inner
        self.name = f"zero3-{inner.name}"  # type: ignore[misc]  (per instance: it names the wrapped kind)
        self.description = inner.description  # type: ignore[misc]
        self.quantized = inner.quantized  # type: ignore[misc]
        self.fan_in_fan_out = inner.fan_in_fan_out  # type: ignore[misc]

    def matches(self, layer: nn.Module) -> bool:
        return is_partitioned(layer) and self.inner.matches(layer)

    def shape(self, layer: nn.Module) -> tuple[int, int]:
        return self.inner.shape(layer)

    def weight_matrix(self, layer: nn.Module) -> torch.Tensor:
        """The placeholder's view (empty outside :meth:`dense_weight`); read the weight through dense_weight."""
        return self.inner.weight_matrix(layer)

    @contextmanager
    def dense_weight(self, layer: nn.Module, dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(layer.parameters(recurse=False)), modifier_rank=None):
            with self.inner.dense_weight(layer, dtype) as matrix:
                yield matrix

    def device(self, layer: nn.Module) -> torch.device:
        return self.inner.device(layer)

    def is_on_meta(self, layer: nn.Module) -> bool:
        return False  # the placeholder is empty, not missing: the gathered weight is real

    def adapter_dtype(self, layer: nn.Module) -> torch.dtype:
        return self.inner.adapter_dtype(layer)

    def can_merge(self, layer: nn.Module) -> bool:
        return self.inner.can_merge(layer)

    def weight_plus(self, layer: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        return self.inner.weight_plus(layer, delta)

    def write_weight(self, layer: nn.Module, value: torch.Tensor) -> None:
        self.inner.write_weight(layer, value)
