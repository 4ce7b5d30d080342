"""Base-layer kinds in one place: what KaSA may wrap, its (out × in) shape, its weight as a dense matrix.

Everything above this module (adapters, the model wrapper, checkpoints) asks these functions and never looks at a
layer's class itself. Supported kinds:

``linear``   ``torch.nn.Linear`` (weight stored out × in)
``conv1d``   ``transformers`` ``Conv1D`` (GPT-2 style, weight stored in × out)
``bnb-4bit`` ``bitsandbytes.nn.Linear4bit`` (nf4/fp4, with or without double quantisation), weight packed uint8
``bnb-8bit`` ``bitsandbytes.nn.Linear8bitLt``, weight int8 with per-row scales ``SCB``: ``W = CB · SCB / 127``

A quantised base is read only: its dequantised weight feeds the truncation and the fingerprint, while the layer
itself stays quantised, so ``base(x)`` — and with adapters disabled, the whole model — is the quantised model's own
output. Under DeepSpeed ZeRO-3 a layer's parameters are partitioned; the dense weight is read inside
``deepspeed.zero.GatheredParameters`` so the truncation sees the whole matrix.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .spectral import MinorComponents, truncate_many

SUPPORTED_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
QUANT_EXTRA_HINT = 'pip install "kasa-peft[quant]"'

# Quantised linear layers of other libraries, recognised by class name so that none of them is ever imported here.
# They hold packed weights KaSA cannot dequantise, so targeting one is an error (PEFT's KaSA silently trains plain
# LoRA on such layers; we refuse instead).
_UNSUPPORTED_QUANTISED_NAMES = {
    "QuantLinear": "GPTQ (auto-gptq / gptqmodel / optimum)",
    "WQLinear_GEMM": "AWQ", "WQLinear_GEMV": "AWQ", "WQLinear_Exllama": "AWQ", "WQLinear_ExllamaV2": "AWQ",
    "WQLinear_IPEX": "AWQ", "WQLinear_Marlin": "AWQ",
    "HQQLinear": "HQQ", "HQQLinearLoRA": "HQQ",
    "QLinear": "optimum-quanto", "EetqLinear": "EETQ", "FP8Linear": "FP8", "EfficientQuantLinear": "AQLM",
    "QuantizedLinear": "AQLM",
}
_UNSUPPORTED_QUANTISED_MODULES = ("auto_gptq", "gptqmodel", "awq", "hqq", "optimum.quanto", "aqlm", "eetq", "torchao")


def _bnb_kind(layer: nn.Module) -> str | None:
    """'bnb-4bit' / 'bnb-8bit' for bitsandbytes layers (checked by module name first, so bnb is imported only if used)."""
    if not type(layer).__module__.startswith("bitsandbytes"):
        return None
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        return "bnb-4bit"
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return "bnb-8bit"
    return None


def unsupported_quantised_reason(layer: nn.Module) -> str | None:
    """A description of ``layer`` if it is a quantised linear layer KaSA cannot wrap, else None."""
    cls = type(layer)
    if _bnb_kind(layer) is not None:
        return None
    library = _UNSUPPORTED_QUANTISED_NAMES.get(cls.__name__)
    if library is None and cls.__module__.startswith(_UNSUPPORTED_QUANTISED_MODULES):
        library = cls.__module__.split(".")[0]
    if library is None and cls.__module__.startswith("bitsandbytes"):
        library = "bitsandbytes"
    if library is None and isinstance(layer, SUPPORTED_LAYER_TYPES):
        weight = getattr(layer, "weight", None)
        # Integer or 1-byte float (fp8) storage in a plain Linear means someone else's quantisation scheme.
        if isinstance(weight, torch.Tensor) and (not weight.dtype.is_floating_point or weight.element_size() == 1):
            library = f"a {weight.dtype} weight"
    if library is None:
        return None
    return f"{cls.__module__}.{cls.__name__} ({library})"


def base_layer_kind(layer: nn.Module) -> str | None:
    """'linear', 'conv1d', 'bnb-4bit' or 'bnb-8bit'; None for a layer KaSA cannot wrap."""
    bnb = _bnb_kind(layer)
    if bnb is not None:
        return bnb
    if unsupported_quantised_reason(layer) is not None:
        return None
    if isinstance(layer, Conv1D):
        return "conv1d"
    if isinstance(layer, nn.Linear):
        return "linear"
    return None


def is_supported(layer: nn.Module) -> bool:
    return base_layer_kind(layer) is not None


def is_quantized(layer: nn.Module) -> bool:
    return base_layer_kind(layer) in ("bnb-4bit", "bnb-8bit")


def can_merge_into(layer: nn.Module) -> bool:
    """Whether ``ΔW − W_minor`` can be added to the layer's stored weight (not for packed quantised weights)."""
    return base_layer_kind(layer) in ("linear", "conv1d")


def require_supported(layer: nn.Module, name: str) -> None:
    """Raise ``TypeError`` naming ``name`` and its type unless KaSA can wrap ``layer``."""
    if is_supported(layer):
        return
    reason = unsupported_quantised_reason(layer)
    if reason is not None:
        raise TypeError(
            f"Module {name!r} is a quantised layer of type {reason}, which KaSA cannot dequantise for its "
            "truncation. Supported bases: torch.nn.Linear, transformers Conv1D, bitsandbytes Linear4bit "
            "(nf4/fp4) and Linear8bitLt. Load the model with bitsandbytes (BitsAndBytesConfig) or unquantised, "
            "or exclude this module from target_modules."
        )
    raise TypeError(
        f"Module {name!r} is a {type(layer).__name__}; KaSA wraps torch.nn.Linear, transformers Conv1D and "
        "bitsandbytes Linear4bit/Linear8bitLt layers only. Narrow target_modules to linear layers."
    )


def _weight_shape(weight: torch.Tensor) -> tuple[int, ...]:
    # A ZeRO-3 partitioned parameter is an empty placeholder; its real shape lives in ds_shape.
    return tuple(getattr(weight, "ds_shape", weight.shape))


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of any supported base layer (Conv1D stores its weight as in × out)."""
    if isinstance(layer, Conv1D):
        in_features, out_features = _weight_shape(layer.weight)
        return out_features, in_features
    return layer.out_features, layer.in_features


def default_adapter_dtype(layer: nn.Module) -> torch.dtype:
    """Adapters train in float32 on half-precision and quantised bases (as PEFT does); float64 bases keep float64."""
    return torch.float64 if layer.weight.dtype == torch.float64 else torch.float32


def _dequantize_4bit(layer: nn.Module) -> torch.Tensor:
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
    import copy

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


def _dequantize_8bit(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    weight = layer.weight
    if weight.dtype != torch.int8:  # has_fp16_weights=True, or not quantised yet: the stored weight is dense
        return weight.data
    # The int8 codes are the weight's data; the per-row scales sit on the parameter until the first forward, which
    # moves them to the layer's MatmulLtState.
    state = getattr(layer, "state", None)
    scales = getattr(weight, "SCB", None)
    if scales is None and state is not None:
        scales = state.SCB
    if scales is None:
        raise ValueError(f"Cannot dequantise {type(layer).__name__}: its int8 weight has no row scales (SCB).")
    return bnb_functional.int8_vectorwise_dequant(weight.data, scales)


def _stored_weight_matrix(layer: nn.Module) -> torch.Tensor:
    kind = base_layer_kind(layer)
    if kind == "conv1d":
        return layer.weight.T
    if kind == "bnb-4bit":
        return _dequantize_4bit(layer)
    if kind == "bnb-8bit":
        return _dequantize_8bit(layer)
    return layer.weight


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out × in) matrix: a view for Linear/Conv1D, a dequantised copy for bitsandbytes.

    Not for ZeRO-3 partitioned layers; read those through :func:`dense_weight`.
    """
    return _stored_weight_matrix(layer)


def _is_zero3_partitioned(layer: nn.Module) -> bool:
    return any(hasattr(param, "ds_id") for param in layer.parameters(recurse=False))


def _gathered(layer: nn.Module):
    """Context in which a ZeRO-3 layer's parameters are whole on every rank (a no-op elsewhere)."""
    if not _is_zero3_partitioned(layer):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(layer.parameters(recurse=False)), modifier_rank=None)


@contextmanager
def dense_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """Yield the layer's (out × in) weight as a dense matrix (dequantised, gathered under ZeRO-3), cast to ``dtype``.

    Inside the context the tensor is valid; under ZeRO-3 it is released again on exit, so copy what you keep.
    """
    with _gathered(layer):
        matrix = _stored_weight_matrix(layer).detach()
        yield matrix if dtype is None else matrix.to(dtype)


def check_weight_readable(layer: nn.Module, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if the weight is on the meta device (nothing to truncate)."""
    if is_on_meta(layer):
        raise ValueError(
            f"Module {name!r} has its weight on the meta device, so its truncation cannot be computed. Load real "
            "weights first, or load a saved adapter with KasaModel.from_pretrained (it needs no SVD)."
        )


def truncate_layers(layers: Mapping[str, nn.Module], r: int, method: str) -> list[MinorComponents]:
    """KaSA's minor components (float64) of each named base layer's dense weight, in ``layers`` order.

    Plain Linear/Conv1D weights are views, so they are batched by shape (see ``truncate_many``). Quantised and
    ZeRO-3 layers are dequantised/gathered and truncated one at a time, so that at most one dense copy of a weight
    exists at once (a 4-bit 7B model dequantised all at once would not fit where it was loaded).
    """
    names = list(layers)
    results: dict[str, MinorComponents] = {}
    one_at_a_time = {n for n in names if is_quantized(layers[n]) or _is_zero3_partitioned(layers[n])}
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


def require_bitsandbytes() -> None:
    """Raise ``ImportError`` naming the extra to install when bitsandbytes is missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"Quantised bases need bitsandbytes (>= 0.48 runs 4-bit on the CPU too): {QUANT_EXTRA_HINT}."
        ) from error


def layer_fingerprint(layer: nn.Module) -> torch.Tensor:
    """``checkpoint.weight_fingerprint`` of the layer's dense (dequantised, gathered) weight."""
    from .checkpoint import weight_fingerprint

    with dense_weight(layer) as weight:
        return weight_fingerprint(weight)


def is_on_meta(layer: nn.Module) -> bool:
    return not _is_zero3_partitioned(layer) and layer.weight.device.type == "meta"
