"""Base-layer kinds behind one seam: what KaSA may wrap, its (out × in) shape, its weight as a dense matrix.

Everything above this package (adapters, the model wrapper, checkpoints, PEFT exchange) calls the functions
exported here and never looks at a layer's class itself. Each kind implements :class:`BaseLayerKind`
(``protocol.py``); an ordered registry (``registry.py``) picks a layer's kind:

==================  =========================================================================================
``bnb.py``          ``bitsandbytes`` ``Linear4bit`` (nf4/fp4, ± double quantisation) and ``Linear8bitLt``
                    (``W = CB · SCB / 127``): read only, dequantised for the truncation and the fingerprint
``unsupported.py``  GPTQ, AWQ, HQQ, quanto, EETQ, FP8, AQLM, torchao layers and integer-weight Linears:
                    refused by name with an error naming the layer type (never imported)
``dense.py``        ``torch.nn.Linear`` (weight stored out × in) and transformers ``Conv1D`` (stored in × out)
``zero3.py``        not a kind but a wrapper: a ZeRO-3 partitioned layer keeps its kind, and its dense weight is
                    read inside ``deepspeed.zero.GatheredParameters`` so the truncation sees the whole matrix
==================  =========================================================================================

Adding a kind (e.g. GPTQ's ``QuantLinear``) is one file and one registry line:

1. Write ``base_layers/<kind>.py`` with a subclass of :class:`BaseLayerKind` and one instance of it: ``matches``
   (check the class's module name before importing its library, as ``bnb.py`` does), ``shape`` (out, in),
   ``weight_matrix`` (the dense out × in weight; set ``reads_a_copy = True`` if it builds a new tensor), and, where
   the stored weight can take a delta in place, ``weight_plus`` / ``write_weight`` (else set ``quantized = True``:
   merges then go through ``merge_and_unload(dtype=…)``, which replaces the layer by a dense ``nn.Linear``).
2. Add the instance to ``registry.KINDS``, before any entry that would also match the layer (before ``REFUSED``
   for a class the refusal table names, and drop it from that table).

Tests: ``tests/test_base_layers.py`` runs the protocol's contract over every registered kind with an example layer
in ``tests/_base_layer_examples.py``; add the new kind's example layer there.
"""

from __future__ import annotations

from .access import (
    add_to_weight,
    can_merge_into,
    check_weight_readable,
    default_adapter_dtype,
    dense_weight,
    dequantized_linear,
    fan_in_fan_out,
    is_on_meta,
    is_quantized,
    is_supported,
    layer_device,
    layer_fingerprint,
    layer_shape,
    require_supported,
    truncate_layers,
    weight_matrix,
    weight_plus,
    write_weight,
)
from .bnb import QUANT_EXTRA_HINT, require_bitsandbytes
from .protocol import BaseLayerKind
from .registry import KINDS, kind_of, require_kind, unsupported_quantised_reason

__all__ = [
    "KINDS",
    "QUANT_EXTRA_HINT",
    "BaseLayerKind",
    "add_to_weight",
    "can_merge_into",
    "check_weight_readable",
    "default_adapter_dtype",
    "dense_weight",
    "dequantized_linear",
    "fan_in_fan_out",
    "is_on_meta",
    "is_quantized",
    "is_supported",
    "kind_of",
    "layer_device",
    "layer_fingerprint",
    "layer_shape",
    "require_bitsandbytes",
    "require_kind",
    "require_supported",
    "truncate_layers",
    "unsupported_quantised_reason",
    "weight_matrix",
    "weight_plus",
    "write_weight",
]
