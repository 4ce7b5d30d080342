"""Dense base layers: ``torch.nn.Linear`` (weight stored out × in) and transformers' ``Conv1D`` (GPT-2 style, weight
stored in × out). Their weight matrix is a view of the stored parameter, and a merge writes into it in place."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .protocol import BaseLayerKind


class _DenseKind(BaseLayerKind):
    def weight_plus(self, layer: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        """``W + delta`` rounded once from a float32 (or wider) sum, in the stored layout and dtype."""
        weight = layer.weight
        if self.fan_in_fan_out:
            delta = delta.T
        # Accumulate in float32 at least, so bf16 bases round once, not per term.
        accum = torch.promote_types(weight.dtype, torch.float32)
        return (weight.data.to(accum) + delta.to(device=weight.device, dtype=accum)).to(weight.dtype)

    def write_weight(self, layer: nn.Module, value: torch.Tensor) -> None:
        # copy_ (not rebinding .data) keeps tied or shared weights tied.
        layer.weight.data.copy_(value)


class LinearKind(_DenseKind):
    name: ClassVar[str] = "linear"
    description: ClassVar[str] = "torch.nn.Linear"

    def matches(self, layer: nn.Module) -> bool:
        return isinstance(layer, nn.Linear)

    def shape(self, layer: nn.Module) -> tuple[int, int]:
        return layer.out_features, layer.in_features

    def weight_matrix(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight


class Conv1DKind(_DenseKind):
    name: ClassVar[str] = "conv1d"
    description: ClassVar[str] = "transformers Conv1D"
    fan_in_fan_out: ClassVar[bool] = True

    def matches(self, layer: nn.Module) -> bool:
        return isinstance(layer, Conv1D)

    def shape(self, layer: nn.Module) -> tuple[int, int]:
        # Conv1D(nf, nx) maps nx inputs to nf outputs; the attributes stay right when ZeRO-3 empties the weight.
        return layer.nf, layer.nx

    def weight_matrix(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight.T  # a view: writing into it writes the layer's weight


LINEAR = LinearKind()
CONV1D = Conv1DKind()
