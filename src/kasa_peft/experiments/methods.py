"""The compared methods, all built the same way and trained through the same Trainer path.

``kasa`` is this package; every baseline comes from PEFT (``peft-kasa``, ``lora``, ``pissa``, ``dora``) or from PEFT's
LoRA layers with a different initialisation (``milora``: MiLoRA, Liu et al. 2024 — PiSSA's construction applied to
the *minor* singular components, which PEFT does not ship). ``full`` trains every parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Trainer

from kasa_peft import KasaConfig, KasaTrainer, get_kasa_model
from kasa_peft.layer import KasaLayer
from kasa_peft.spectral import truncate_many
from kasa_peft.trainer import RegularizedTrainerMixin

METHODS = ("kasa", "peft-kasa", "lora", "pissa", "milora", "dora", "full")


@dataclass
class AdapterSettings:
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])
    modules_to_save: list[str] | None = None
    beta: float = 1e-4
    gamma: float = 1e-3
    # KaSA only (see KasaConfig): None = the library default; calibration batches feed the guard / activation basis.
    truncation_guard: str | None = None
    truncation_guard_loss_tolerance: float | None = None  # truncation_guard="budget" only
    truncation_basis: str = "weight"
    calibration_batches: list[dict] | None = None
    #: KaSA's regulariser form (``KasaConfig.regularization_form``): "paper" or "authors". Only ``kasa`` uses it.
    regularization_form: str = "paper"


@dataclass
class PreparedModel:
    model: nn.Module
    trainer_class: type[Trainer]
    notes: list[str]
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None


class HarnessTrainer(RegularizedTrainerMixin, Trainer):
    """Trainer for the baselines: an optional regulariser, logging and completion-marked checkpoints as KaSA's."""

    regularizer: Callable[[nn.Module], torch.Tensor] | None = None

    def regularization_term(self, model):
        return self.regularizer(model) if self.regularizer is not None else None


def _peft_lora_config(settings: AdapterSettings, **extra):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        modules_to_save=settings.modules_to_save,
        **extra,
    )


def _peft_kasa_loss(model: nn.Module) -> torch.Tensor:
    inner = getattr(model, "module", model)  # DDP
    loss = inner.base_model._get_kasa_loss()
    return loss if torch.is_tensor(loss) else torch.tensor(float(loss))


def _init_milora(peft_model: nn.Module, adapter_name: str = "default") -> int:
    """MiLoRA init on PEFT LoRA layers: A = √Σ_r V_rᵀ, B = U_r √Σ_r (minor triplets), base W ← W − U_rΣ_rV_rᵀ.

    Both factors are divided by √scaling so that scaling·B·A equals the removed minor part exactly at step 0.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]
    weights = []
    for layer in layers:
        weight = layer.get_base_layer().weight
        weights.append(weight.T if layer.fan_in_fan_out else weight)
    r = layers[0].r[adapter_name]
    minors = truncate_many(weights, r)
    with torch.no_grad():
        for layer, weight, minor in zip(layers, weights, minors):
            root_sigma = minor.singular_values.clamp_min(0).sqrt()
            u = minor.minor_u_sigma / torch.where(minor.singular_values > 0, minor.singular_values, 1.0)
            inv_sqrt_scale = 1.0 / math.sqrt(layer.scaling[adapter_name])
            a = root_sigma[:, None] * minor.minor_vh * inv_sqrt_scale
            b = u * root_sigma[None, :] * inv_sqrt_scale
            lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            lora_a.copy_(a.to(lora_a.dtype))
            lora_b.copy_(b.to(lora_b.dtype))
            weight.sub_(minor.product().to(weight.dtype))
    return len(layers)


def prepare_model(model: nn.Module, method: str, settings: AdapterSettings) -> PreparedModel:
    """Wrap ``model`` for ``method``; returns the model, the Trainer class to use and notes for the report."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")
    if method == "kasa":
        config = KasaConfig(
            r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
            target_modules=settings.target_modules, modules_to_save=settings.modules_to_save,
            beta=settings.beta, gamma=settings.gamma, regularization_form=settings.regularization_form,
            truncation_basis=settings.truncation_basis,
            **({"truncation_guard": settings.truncation_guard} if settings.truncation_guard is not None else {}),
            **({"truncation_guard_loss_tolerance": settings.truncation_guard_loss_tolerance}
               if settings.truncation_guard_loss_tolerance is not None else {}),
        )
        model = get_kasa_model(model, config, calibration_batches=settings.calibration_batches)
        notes = [] if settings.regularization_form == "paper" else [f"kasa: regularization_form={settings.regularization_form!r}"]
        if settings.truncation_basis != "weight":
            notes.append("kasa: activation-basis truncation (research variant, not the paper's method)")
        return PreparedModel(model, KasaTrainer, notes)
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return PreparedModel(model, HarnessTrainer, ["full fine-tuning: every parameter trains"])

    from peft import get_peft_model
    from peft.tuners.lora import KasaConfig as PeftKasaConfig

    notes: list[str] = []
    regularizer = None
    if method == "lora":
        config = _peft_lora_config(settings)
    elif method == "dora":
        config = _peft_lora_config(settings, use_dora=True)
    elif method == "pissa":
        config = _peft_lora_config(settings, init_lora_weights="pissa")
        notes.append("pissa: PEFT init_lora_weights='pissa' (full SVD; base holds the residual)")
    elif method == "milora":
        config = _peft_lora_config(settings)
        notes.append("milora: PEFT LoRA layers, A/B set from the r minor singular triplets, base holds the rest")
    else:  # peft-kasa
        config = _peft_lora_config(settings, kasa_config=PeftKasaConfig(beta=settings.beta, gamma=settings.gamma))
        regularizer = _peft_kasa_loss
        notes.append("peft-kasa: PEFT's KaSA variant, its _get_kasa_loss() added to the loss")
        if settings.regularization_form != "paper":
            notes.append("peft-kasa: regularization_form does not apply (PEFT's own regulariser)")
    peft_model = get_peft_model(model, config)
    if method == "milora":
        _init_milora(peft_model)
    return PreparedModel(peft_model, HarnessTrainer, notes, regularizer)


def kasa_sigma_by_layer(model: nn.Module) -> dict[str, list[float]]:
    """Learned σ of the active KaSA adapter per layer (empty for other methods)."""
    inner = getattr(model, "module", model)
    if not hasattr(inner, "kasa_layers"):
        return {}
    result = {}
    for name, layer in inner.kasa_layers():
        assert isinstance(layer, KasaLayer)
        adapter = layer.kasa_adapters[inner.active_adapter]
        if adapter.sigma is not None:
            result[name] = adapter.sigma.detach().float().cpu().tolist()
    return result
