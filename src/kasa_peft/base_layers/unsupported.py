"""Quantised layers of other libraries, refused by name so that none of them is ever imported here.

They hold packed weights KaSA cannot dequantise, so targeting one is an error (PEFT's KaSA silently trains plain
LoRA on such layers; we refuse instead). The registry asks this table after the kinds it supports that could look
alike (bitsandbytes) and before the dense kinds (some of these classes subclass ``nn.Linear``); a library that gains
a kind of its own leaves this table.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .protocol import BaseLayerKind

# Class name → library.
UNSUPPORTED_CLASS_NAMES: dict[str, str] = {
    "QuantLinear": "GPTQ (auto-gptq / gptqmodel / optimum)",
    "WQLinear_GEMM": "AWQ", "WQLinear_GEMV": "AWQ", "WQLinear_Exllama": "AWQ", "WQLinear_ExllamaV2": "AWQ",
    "WQLinear_IPEX": "AWQ", "WQLinear_Marlin": "AWQ",
    "HQQLinear": "HQQ", "HQQLinearLoRA": "HQQ",
    "QLinear": "optimum-quanto", "EetqLinear": "EETQ", "FP8Linear": "FP8", "EfficientQuantLinear": "AQLM",
    "QuantizedLinear": "AQLM",
}
# Module prefixes whose classes are quantised layers whatever their name. bitsandbytes comes last: its supported
# classes are matched by their own kinds before this table is asked.
UNSUPPORTED_MODULE_PREFIXES = ("auto_gptq", "gptqmodel", "awq", "hqq", "optimum.quanto", "aqlm", "eetq", "torchao")


def refusal_reason(layer: nn.Module) -> str | None:
    """``module.Class (library)`` if ``layer`` is a quantised linear layer of a library KaSA cannot read, else None."""
    cls = type(layer)
    library = UNSUPPORTED_CLASS_NAMES.get(cls.__name__)
    if library is None and cls.__module__.startswith(UNSUPPORTED_MODULE_PREFIXES):
        library = cls.__module__.split(".")[0]
    if library is None and cls.__module__.startswith("bitsandbytes"):
        library = "bitsandbytes"
    if library is None and isinstance(layer, (nn.Linear, Conv1D)):
        weight = getattr(layer, "weight", None)
        # Integer or 1-byte float (fp8) storage in a plain Linear means someone else's quantisation scheme.
        if isinstance(weight, torch.Tensor) and (not weight.dtype.is_floating_point or weight.element_size() == 1):
            library = f"a {weight.dtype} weight"
    if library is None:
        return None
    return f"{cls.__module__}.{cls.__name__} ({library})"


class RefusedKind(BaseLayerKind):
    """The table as a registry entry: a layer it matches has no kind (``registry.kind_of`` returns None for it)."""

    name: ClassVar[str] = "unsupported"
    description: ClassVar[str] = "quantised layers of other libraries (refused)"

    def matches(self, layer: nn.Module) -> bool:
        return refusal_reason(layer) is not None

    def shape(self, layer: nn.Module) -> tuple[int, int]:
        raise TypeError(f"KaSA cannot wrap {refusal_reason(layer)}.")

    def weight_matrix(self, layer: nn.Module) -> torch.Tensor:
        raise TypeError(f"KaSA cannot dequantise {refusal_reason(layer)}.")


REFUSED = RefusedKind()
