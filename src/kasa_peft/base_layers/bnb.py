"""bitsandbytes bases: ``Linear4bit`` (nf4/fp4, with or without double quantisation; weight packed uint8) and
``Linear8bitLt`` (weight int8 with per-row scales ``SCB``: ``W = CB · SCB / 127``).

A quantised base is read only: its dequantised weight feeds the truncation and the fingerprint, while the layer
itself stays quantised, so ``base(x)`` — and with adapters disabled, the whole model — is the quantised model's own
output. bitsandbytes is imported only once a layer's class says it comes from there.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import nn

from .protocol import BaseLayerKind

QUANT_EXTRA_HINT = 'pip install "kasa-peft[quant]"'


def _from_bitsandbytes(layer: nn.Module) -> bool:
    return type(layer).__module__.startswith("bitsandbytes")


def require_bitsandbytes() -> None:
    """Raise ``ImportError`` naming the extra to install when bitsandbytes is missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"Quantised bases need bitsandbytes (>= 0.48 runs 4-bit on the CPU too): {QUANT_EXTRA_HINT}."
        ) from error


class _BnbKind(BaseLayerKind):
    quantized: ClassVar[bool] = True
    reads_a_copy: ClassVar[bool] = True

    def shape(self, layer: nn.Module) -> tuple[int, int]:
        return layer.out_features, layer.in_features


class Linear4bitKind(_BnbKind):
    name: ClassVar[str] = "bnb-4bit"
    description: ClassVar[str] = "bitsandbytes Linear4bit (nf4/fp4)"

    def matches(self, layer: nn.Module) -> bool:
        if not _from_bitsandbytes(layer):
            return False
        import bitsandbytes as bnb

        return isinstance(layer, bnb.nn.Linear4bit)

    def weight_matrix(self, layer: nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as bnb_functional

        weight = layer.weight
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:  # not quantised yet (bitsandbytes quantises when the layer is moved to a device)
            return weight.data
        codes = weight.data
        if getattr(quant_state, "packing_format_for_cpu", False):
            codes, quant_state = _unpack_cpu_layout(codes, quant_state)
        return bnb_functional.dequantize_4bit(codes, quant_state)


def _unpack_cpu_layout(codes: torch.Tensor, quant_state):
    """Undo bitsandbytes' CPU inference layout (set by the first no-grad forward) on copies; the layer is untouched.

    That layout stores the per-block scales as a (blocks × out) bfloat16 matrix, with double quantisation already
    undone; the weight the layer computes with is ``code × that scale``, so we dequantise with exactly those scales
    (bitsandbytes' own inverse would re-quantise them, a second rounding the layer never applies).
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError as error:  # a private helper; name the version we need rather than fail obscurely
        raise ImportError(
            "This bitsandbytes version packs 4-bit CPU weights in a layout kasa_peft cannot read; use "
            "bitsandbytes 0.48-0.50, or run one forward with gradients enabled before adding the adapter."
        ) from error
    state = copy.copy(quant_state)  # shallow: the inverse only rebinds attributes of the state it is given
    state.original_nested = False  # keep the bf16 scales as they are (see above)
    unpacked, state = _convert_weight_packed_for_cpu_inverse(codes, state)
    state.absmax = quant_state.absmax.T.reshape(-1).float()
    state.nested = False
    return unpacked, state


class Linear8bitKind(_BnbKind):
    name: ClassVar[str] = "bnb-8bit"
    description: ClassVar[str] = "bitsandbytes Linear8bitLt"

    def matches(self, layer: nn.Module) -> bool:
        if not _from_bitsandbytes(layer):
            return False
        import bitsandbytes as bnb

        return isinstance(layer, bnb.nn.Linear8bitLt)

    def weight_matrix(self, layer: nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as bnb_functional

        weight = layer.weight
        if weight.dtype != torch.int8:  # has_fp16_weights=True, or not quantised yet: the stored weight is dense
            return weight.data
        # The int8 codes are the weight's data; the per-row scales sit on the parameter until the first forward,
        # which moves them to the layer's MatmulLtState.
        state = getattr(layer, "state", None)
        scales = getattr(weight, "SCB", None)
        if scales is None and state is not None:
            scales = state.SCB
        if scales is None:
            raise ValueError(f"Cannot dequantise {type(layer).__name__}: its int8 weight has no row scales (SCB).")
        return bnb_functional.int8_vectorwise_dequant(weight.data, scales)


LINEAR_4BIT = Linear4bitKind()
LINEAR_8BIT = Linear8bitKind()
