"""What KaSA's truncation does to a model before any training: per-module figures and the calibration loss change.

For a targeted module with frozen weight ``W`` (out × in), dropped part ``W_minor`` (rank r) and the inputs
``X`` (in × n tokens) that reach it in the *original* model on calibration batches, the report gives

    dropped_energy  = ‖W_minor‖_F² / ‖W‖_F²          (weight space; what the paper's argument is about)
    sigma_ratio     = σ_max(W_minor) / σ_max(W)       (largest dropped singular value relative to the largest kept)
    output_change   = ‖W_minor X‖_F / ‖W X‖_F         (activation space, bias excluded; what the model feels)

and, for the model, the calibration loss of the original model (``disable_adapter``) and of the truncated one
(every ``W`` replaced by ``W − W_minor``, no adapter update — exactly a fresh KaSA model, whose B = 0). Optionally
the loss change when only one module is truncated.

Measuring never modifies the model: the truncation is applied by forward hooks on the frozen base layers, which
subtract ``W_minor x`` from their output, inside ``disable_adapter()``. One forward pass per batch collects every
module's statistics; the truncated loss needs one more, and each per-module loss one more again.

Calibration batches are dicts of model inputs (``tokenizer(text, return_tensors="pt")``, plus ``labels`` for a
loss). Positions where ``attention_mask`` is 0 are left out of the statistics.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base_layers import dense_weight, layer_shape
from .spectral import MinorComponents

REPORT_FILE_NAME = "truncation_report.json"


# ----------------------------------------------------------------------------------------------- results
@dataclass
class ModuleTruncation:
    """Figures for one targeted module (see the module docstring for the definitions)."""

    name: str
    shape: tuple[int, int]  # (out, in)
    r: int
    truncated: bool  # False: kept whole (truncation_skipped_modules)
    dropped_energy: float
    sigma_ratio: float
    output_change: float | None  # None when no calibration token reached the module
    loss_change_alone: float | None = None  # loss(only this module truncated) − loss(original)
    flagged: bool = False  # over the threshold(s) the report was built with


@dataclass
class TruncationReport:
    """Per-module figures and whole-model calibration losses. ``to_dict()`` is JSON-serialisable."""

    modules: list[ModuleTruncation]
    tokens: int
    batches: int
    loss_original: float | None
    loss_truncated: float | None
    basis: str = "weight"
    max_output_change: float | None = None
    max_loss_increase: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def loss_change(self) -> float | None:
        if self.loss_original is None or self.loss_truncated is None:
            return None
        return self.loss_truncated - self.loss_original

    def flagged_modules(self) -> list[str]:
        return [m.name for m in self.modules if m.flagged]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loss_change"] = self.loss_change
        data["modules"] = [{**asdict(m), "shape": list(m.shape)} for m in self.modules]
        data["format"] = "kasa_peft.truncation_report/1"
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TruncationReport":
        modules = [ModuleTruncation(**{**m, "shape": tuple(m["shape"])}) for m in data["modules"]]
        known = {"tokens", "batches", "loss_original", "loss_truncated", "basis", "max_output_change",
                 "max_loss_increase", "notes"}
        return cls(modules=modules, **{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------------------------- calibration data
def check_calibration_batches(batches: Iterable[Mapping[str, Any]] | None, model: nn.Module) -> list[dict]:
    """Materialise ``batches`` and check they look like inputs of ``model``; ``ValueError`` in one line otherwise."""
    if batches is None:
        raise ValueError("No calibration batches: pass calibration_batches=[tokenizer(text, return_tensors='pt'), ...].")
    if isinstance(batches, Mapping):
        batches = [batches]  # one batch given bare
    batches = list(batches)
    if not batches:
        raise ValueError("calibration_batches is empty: pass at least one batch (a dict of model inputs).")
    forward = inspect.signature(model.forward).parameters
    takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in forward.values())
    accepted = [n for n, p in forward.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    checked = []
    for index, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or not batch:
            raise ValueError(
                f"calibration batch {index} is a {type(batch).__name__}, not a non-empty dict of model inputs "
                "(e.g. tokenizer(text, return_tensors='pt'))."
            )
        unknown = sorted(k for k in batch if k not in accepted)
        if unknown and not takes_any:
            raise ValueError(
                f"calibration batch {index} has keys {unknown} that {type(model).__name__}.forward does not accept "
                f"(it takes {', '.join(accepted[:8])}, …)."
            )
        if not any(torch.is_tensor(v) for v in batch.values()):
            raise ValueError(f"calibration batch {index} holds no tensors; pass tokenized inputs (return_tensors='pt').")
        checked.append(dict(batch))
    return checked


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _token_mask(batch: dict) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    return mask.bool() if torch.is_tensor(mask) and mask.dim() == 2 else None


def _tokens_of(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The layer input's token rows (n × features), without padded positions when the shapes line up."""
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        return x[mask]
    return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------------------------- forward plumbing
def signature_model(model: nn.Module) -> nn.Module:
    """The model whose forward signature counts (a KasaModel forwards to its base model)."""
    return getattr(model, "base_model", model) if hasattr(model, "kasa_layers") else model


@contextlib.contextmanager
def original_model(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad, adapters disabled (a KasaModel then computes exactly the original model)."""
    was_training = model.training
    disable = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    model.eval()
    try:
        with disable, torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def truncation_applied(layers: Mapping[str, nn.Module], minors: Mapping[str, MinorComponents]) -> Iterator[None]:
    """Forward hooks that make each named base layer compute ``(W − W_minor) x + b`` instead of ``W x + b``."""

    def hook(minor: MinorComponents, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        down = minor.minor_vh.to(device=x.device, dtype=x.dtype)
        up = minor.minor_u_sigma.to(device=x.device, dtype=x.dtype)
        return output - F.linear(F.linear(x, down), up).to(output.dtype)

    handles = [layers[name].register_forward_hook(_bind(hook, minors[name])) for name in minors]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _bind(function, *bound):
    return lambda *args: function(*bound, *args)


def _run(model: nn.Module, batches: list[dict], want_loss: bool, on_batch=None) -> float | None:
    """Forward every batch; returns the mean of the batches' losses (None if they carry no labels)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    losses = []
    for index, batch in enumerate(batches):
        batch = _to_device(batch, device)
        if on_batch is not None:
            on_batch(_token_mask(batch))
        try:
            output = model(**batch)
        except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"calibration batch {index} does not fit the model ({type(signature_model(model)).__name__}): "
                f"{type(error).__name__}: {first_line}"
            ) from None
        loss = getattr(output, "loss", None) if not isinstance(output, Mapping) else output.get("loss")
        if want_loss and loss is not None:
            losses.append(float(loss))
    return sum(losses) / len(losses) if losses else None


@dataclass
class _Accumulator:
    minor_sq: float = 0.0
    full_sq: float = 0.0
    tokens: int = 0
    second_moment: torch.Tensor | None = None


def collect_layer_statistics(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: list[dict],
    minors: Mapping[str, MinorComponents] | None = None,
    second_moments: bool = False,
) -> tuple[dict[str, _Accumulator], float | None]:
    """One pass of the original model over ``batches``; per layer Σ‖W_minor x‖², Σ‖W x‖², token count and, with
    ``second_moments``, ``C = (1/n) Σ x xᵀ`` (float64, in × in). Also returns the original model's mean loss."""
    stats = {name: _Accumulator() for name in layers}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = _tokens_of(args[0], state["mask"])
        acc = stats[name]
        acc.tokens += x.shape[0]
        if second_moments:
            x64 = x.detach().to(torch.float64)
            moment = x64.mT @ x64
            acc.second_moment = moment if acc.second_moment is None else acc.second_moment + moment
        if minors is not None and name in minors:
            wx = _tokens_of(output, state["mask"]).to(torch.float64)
            bias = getattr(module, "bias", None)
            if bias is not None:
                wx = wx - bias.detach().to(torch.float64)
            minor = minors[name]
            dropped = (x.to(torch.float64) @ minor.minor_vh.to(device=x.device, dtype=torch.float64).mT) @ minor.minor_u_sigma.to(
                device=x.device, dtype=torch.float64
            ).mT
            acc.minor_sq += float(dropped.square().sum())
            acc.full_sq += float(wx.square().sum())

    handles = [module.register_forward_hook(_bind(hook, name)) for name, module in layers.items()]
    try:
        with original_model(model):
            loss = _run(model, batches, want_loss=True, on_batch=lambda mask: state.__setitem__("mask", mask))
    finally:
        for handle in handles:
            handle.remove()
    for acc in stats.values():
        if second_moments and acc.second_moment is not None:
            acc.second_moment = acc.second_moment / max(acc.tokens, 1)
    return stats, loss


def truncated_loss(
    model: nn.Module, layers: Mapping[str, nn.Module], minors: Mapping[str, MinorComponents], batches: list[dict]
) -> float | None:
    """Mean calibration loss with ``minors`` subtracted from the named layers, adapters disabled."""
    with original_model(model), truncation_applied(layers, minors):
        return _run(model, batches, want_loss=True)


# ----------------------------------------------------------------------------------------------- the report
def _weight_figures(layer: nn.Module, minor: MinorComponents) -> tuple[float, float]:
    with dense_weight(layer, torch.float64) as w64:  # dequantised / gathered where needed
        w64 = w64.clone()
    total_sq = float(w64.square().sum())
    dropped_sq = float(minor.singular_values.to(torch.float64).square().sum())
    sigma_max = float(torch.linalg.matrix_norm(w64, ord=2))
    largest_dropped = float(minor.singular_values.max()) if minor.singular_values.numel() else 0.0
    return (dropped_sq / total_sq if total_sq > 0 else 0.0), (largest_dropped / sigma_max if sigma_max > 0 else 0.0)


def measure_truncation(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    minors: Mapping[str, MinorComponents | None],
    batches: Iterable[Mapping[str, Any]],
    *,
    per_module_loss: bool = False,
    max_output_change: float | None = None,
    max_loss_increase: float | None = None,
    basis: str = "weight",
) -> TruncationReport:
    """Build the report for base ``layers`` (name → frozen Linear/Conv1D) and their dropped parts ``minors``
    (``None`` for a module kept untruncated). ``model`` is what gets called on the batches (a KasaModel or a plain
    model; adapters are disabled while measuring). Modules over a threshold are ``flagged``."""
    batches = check_calibration_batches(batches, signature_model(model))
    truncated = {name: minor for name, minor in minors.items() if minor is not None}
    stats, loss_original = collect_layer_statistics(model, layers, batches, truncated)
    loss_truncated = truncated_loss(model, layers, truncated, batches) if loss_original is not None else None
    notes = []
    if loss_original is None:
        notes.append("the calibration batches carry no labels (or the model returns no loss): no loss figures")
    modules = []
    for name, layer in layers.items():
        minor = minors.get(name)
        acc = stats[name]
        if minor is None:
            energy, ratio, change = 0.0, 0.0, 0.0 if acc.tokens else None
        else:
            energy, ratio = _weight_figures(layer, minor)
            change = math.sqrt(acc.minor_sq / acc.full_sq) if acc.tokens and acc.full_sq > 0 else None
        alone = None
        if per_module_loss and minor is not None and loss_original is not None:
            alone = truncated_loss(model, layers, {name: minor}, batches) - loss_original
        flagged = minor is not None and (
            (max_output_change is not None and change is not None and change > max_output_change)
            or (max_loss_increase is not None and alone is not None and alone > max_loss_increase)
        )
        r = int(minor.singular_values.numel()) if minor is not None else 0
        modules.append(ModuleTruncation(name, layer_shape(layer), r, minor is not None, energy, ratio, change, alone, flagged))
    return TruncationReport(
        modules=modules,
        tokens=max((acc.tokens for acc in stats.values()), default=0),
        batches=len(batches),
        loss_original=loss_original,
        loss_truncated=loss_truncated,
        basis=basis,
        max_output_change=max_output_change,
        max_loss_increase=max_loss_increase,
        notes=notes,
    )


def adapter_minor_components(kasa_model: nn.Module, adapter_name: str | None = None) -> tuple[dict, dict]:
    """(name → base layer, name → the adapter's dropped part or None) for every layer carrying ``adapter_name``."""
    from .activation_basis import canonical_minor_components

    name = adapter_name or kasa_model.active_adapter
    if name not in kasa_model.peft_config:
        raise ValueError(f"Unknown adapter {name!r}; this model has {sorted(kasa_model.peft_config)}.")
    layers, minors = {}, {}
    for path, layer in kasa_model.kasa_layers():
        if name not in layer.kasa_adapters:
            continue
        adapter = layer.kasa_adapters[name]
        layers[path] = layer.base_layer
        if adapter.truncate:
            # The saved factors' product is what the layer subtracts; re-canonicalise it for exact singular values.
            minors[path] = canonical_minor_components(adapter.minor_u_sigma.detach(), adapter.minor_vh.detach())
        else:
            minors[path] = None
    return layers, minors


def truncation_report(
    kasa_model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    adapter_name: str | None = None,
    per_module_loss: bool = False,
    max_output_change: float | None = None,
    max_loss_increase: float | None = None,
) -> TruncationReport:
    """The report for one adapter of a :class:`~kasa_peft.KasaModel` (default: the active one), as it is now.

    Thresholds default to the adapter config's guard thresholds. The model is left exactly as it was.
    """
    layers, minors = adapter_minor_components(kasa_model, adapter_name)
    config = kasa_model.peft_config[adapter_name or kasa_model.active_adapter]
    if not layers:
        raise ValueError(f"Adapter {adapter_name or kasa_model.active_adapter!r} adapts no layer; nothing to report.")
    return measure_truncation(
        kasa_model, layers, minors, batches,
        per_module_loss=per_module_loss,
        max_output_change=config.truncation_guard_max_output_change if max_output_change is None else max_output_change,
        max_loss_increase=config.truncation_guard_max_loss_increase if max_loss_increase is None else max_loss_increase,
        basis=getattr(config, "truncation_basis", "weight"),
    )
