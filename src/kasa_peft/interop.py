"""Checkpoint exchange with Hugging Face PEFT (≥ 0.21): import its KaSA/LoRA adapters, export ours.

PEFT stores only ``lora_A``, ``lora_B`` and ``lora_diag``; its KaSA truncation is re-derived from the base weight by a
full SVD every time it loads, and it overwrites the base weight. Importing therefore computes the truncation once here
(our float64 path; PEFT uses float32 SVD, so the two agree to float32 round-off of the dropped component). Exporting
offers two formats:

``"kasa"``  PEFT's own KaSA variant (``LoraConfig(kasa_config=...)``): same outputs, but PEFT will truncate the base
            destructively on load, as it always does.
``"lora"``  an exact rank-2r plain LoRA: ``A' = [A; V_rᵀ]``, ``B' = [(α/r)·B·diag(σ), −U_rΣ_r]``, ``lora_alpha = 2r``
            (scaling 1). It reproduces truncation + update on the *untouched* base and loads in any PEFT version.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import checkpoint
from .base_layers import fan_in_fan_out, is_quantized, layer_shape
from .layer import KasaLayer

if TYPE_CHECKING:
    from .model import KasaModel

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _read_peft_config(path: Path):
    from peft import LoraConfig

    config_path = path / PEFT_CONFIG_NAME
    raw = checkpoint.read_json_object(config_path)
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{path} holds a PEFT {raw.get('peft_type')} adapter; only LoRA and KaSA (a LoRA variant) import.")
    try:
        return LoraConfig.from_pretrained(str(path))
    except (TypeError, ValueError) as error:
        raise checkpoint.AdapterFileError(f"{config_path}: not a valid peft.LoraConfig ({error}).") from None


def _peft_tensor_key(path: Path, key: str) -> str:
    """PEFT's ``base_model.model.<module>.lora_A.weight`` (… ``lora_B.weight``, ``lora_diag``) → ``<module>.lora_A``
    (… ``lora_B``, ``sigma``); anything else is an error naming the tensor."""
    names = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_diag": "sigma"}
    if key.startswith(_PEFT_PREFIX):
        for suffix, ours in names.items():
            if key.endswith("." + suffix):
                return f"{key[len(_PEFT_PREFIX) : -len(suffix) - 1]}.{ours}"
    raise ValueError(
        f"{path / PEFT_WEIGHTS_NAME}: unexpected tensor {key!r}; a PEFT LoRA/KaSA checkpoint this package imports holds "
        "only base_model.model.<module>.lora_A.weight, lora_B.weight and (KaSA) lora_diag."
    )


def _kasa_config_from_peft(lora):
    """The KasaConfig computing what PEFT computes with ``lora``; ValueError for anything we do not implement."""
    from .config import config_from_peft_lora

    if lora.modules_to_save:
        raise ValueError("importing PEFT modules_to_save is not supported; re-save the adapter without them.")
    if lora.kasa_config is None:
        return config_from_peft_lora(lora)
    kasa = lora.kasa_config
    beta = kasa["beta"] if isinstance(kasa, dict) else kasa.beta
    gamma = kasa["gamma"] if isinstance(kasa, dict) else kasa.gamma
    # Same translation as a plain LoRA config, then switched to KaSA with PEFT's β and γ.
    plain = copy.copy(lora)
    plain.kasa_config = None
    return dataclasses.replace(config_from_peft_lora(plain), adapter_type="kasa", truncate=True, beta=beta, gamma=gamma)


def load_peft_kasa_adapter(kasa_model: "KasaModel", path: str | Path, adapter_name: str = "default", is_trainable: bool = False) -> None:
    """Add a PEFT KaSA (or plain LoRA) checkpoint at ``path`` to ``kasa_model`` as ``adapter_name``.

    The KaSA truncation is computed here (PEFT does not store it); everything else is copied. Every tensor of the
    file must be one the adapter uses, and every tensor the adapter needs must be in the file: an unknown tensor
    (a LoRA bias, DoRA magnitudes, …) is an error, not silently dropped. All checks run before the model changes.
    """
    from .targeting import find_target_modules

    path = Path(path)
    lora = _read_peft_config(path)
    try:
        config = _kasa_config_from_peft(lora)
    except ValueError as error:
        raise checkpoint.AdapterFileError(f"{path / PEFT_CONFIG_NAME}: {error}") from None
    tensors, _ = checkpoint.load_tensors(path / PEFT_WEIGHTS_NAME)
    renamed = {_peft_tensor_key(path, key): value for key, value in tensors.items()}
    original_keys = {_peft_tensor_key(path, key): key for key in tensors}
    kinds = ("lora_A", "lora_B", "sigma") if config.adapter_type == "kasa" else ("lora_A", "lora_B")
    targets = find_target_modules(kasa_model.base_model, config)
    expected = {f"{target}.{kind}" for target in targets for kind in kinds}
    if set(renamed) != expected:
        extra = sorted(original_keys[key] for key in set(renamed) - expected)
        missing = sorted(expected - set(renamed))
        raise ValueError(
            f"{path / PEFT_WEIGHTS_NAME} does not fit this model: tensors for modules its target_modules do not match "
            f"here: {extra[:6]}; tensors missing: {missing[:6]}. Load it onto the base model it was trained on."
        )
    for target in targets:
        module = kasa_model.base_model.get_submodule(target)
        out_features, in_features = layer_shape(module.base_layer if isinstance(module, KasaLayer) else module)
        shapes = {"lora_A": (config.r, in_features), "lora_B": (out_features, config.r), "sigma": (config.r,)}
        for kind in kinds:
            key = f"{target}.{kind}"
            if tuple(renamed[key].shape) != shapes[kind]:
                raise ValueError(
                    f"{path / PEFT_WEIGHTS_NAME}: {key} has shape {tuple(renamed[key].shape)}, this model expects "
                    f"{shapes[kind]}."
                )
    kasa_model._inject(adapter_name, config, init="compute")
    # Keep the truncation just computed; take A, B, σ from the checkpoint.
    for module_path, layer in kasa_model.kasa_layers():
        if adapter_name not in layer.kasa_adapters:
            continue
        adapter = layer.kasa_adapters[adapter_name]
        with torch.no_grad():
            for kind in kinds:
                getattr(adapter, kind).copy_(renamed[f"{module_path}.{kind}"])
    kasa_model.set_adapter_trainable(adapter_name, is_trainable)


def exact_paths_regex(paths: list[str]) -> str:
    """A regex that ``re.fullmatch``-es exactly the given module paths (PEFT's rule for a string target_modules)."""
    return "^(?:" + "|".join(re.escape(path) for path in paths) + ")$"


def export_peft_checkpoint(
    kasa_model: "KasaModel", save_directory: str | Path, adapter_name: str | None = None, format: str = "kasa"
) -> None:
    """Write ``adapter_name`` so that ``peft.PeftModel.from_pretrained(base, save_directory)`` reproduces it.

    ``format="kasa"``: PEFT's KaSA variant (nn.Linear targets only, as PEFT requires; PEFT truncates on load).
    ``format="lora"``: an exact, non-destructive rank-2r plain LoRA (see module docstring).
    """
    from peft import LoraConfig
    from peft.tuners.lora import KasaConfig as PeftKasaConfig

    if format not in ("kasa", "lora"):
        raise ValueError(f"format must be 'kasa' or 'lora', got {format!r}.")
    name = adapter_name or kasa_model.active_adapter
    kasa_model._require_adapter(name)
    config = kasa_model.peft_config[name]
    if format == "kasa" and config.adapter_type != "kasa":
        raise ValueError(f"Adapter {name!r} is a plain LoRA adapter; export it with format='lora'.")
    if format == "kasa" and not config.truncate:
        raise ValueError(
            f"Adapter {name!r} was trained without truncation (truncate=False), but PEFT's KaSA always truncates the "
            "base on load, so it would compute something else; export it with format='lora' (exact)."
        )
    if format == "kasa" and (config.truncation_skipped_modules or config.truncation_basis != "weight"):
        # PEFT re-derives the weight-basis truncation of every module on load: it would not reproduce this adapter.
        raise ValueError(
            f"Adapter {name!r} keeps modules untruncated or uses the activation basis, which PEFT's KaSA cannot "
            "represent; export it with format='lora' (exact)."
        )
    if config.modules_to_save:
        raise ValueError("Exporting modules_to_save to PEFT is not supported yet; export the adapter without them.")
    tensors: dict[str, torch.Tensor] = {}
    paths: list[str] = []
    for module_path, layer in kasa_model.kasa_layers():
        if name not in layer.kasa_adapters:
            continue
        if format == "kasa" and fan_in_fan_out(layer.base_layer):
            raise ValueError(
                f"PEFT's KaSA rejects Conv1D layers ({module_path!r}); export with format='lora' instead."
            )
        if format == "kasa" and is_quantized(layer.base_layer):
            raise ValueError(
                f"PEFT's KaSA silently trains and applies plain LoRA on quantised layers ({module_path!r}), dropping σ "
                "and the truncation; export with format='lora' instead."
            )
        adapter = layer.kasa_adapters[name]
        prefix = f"{_PEFT_PREFIX}{module_path}."
        if format == "kasa":
            tensors[prefix + "lora_A.weight"] = adapter.lora_A
            tensors[prefix + "lora_B.weight"] = adapter.lora_B
            tensors[prefix + "lora_diag"] = adapter.sigma
        else:
            lora_a, lora_b = [adapter.lora_A], [adapter.lora_B * adapter.update_scale()]
            if adapter.truncate:
                lora_a.append(adapter.minor_vh)
                lora_b.append(-adapter.minor_u_sigma)
            elif config.uses_truncation:  # a module kept untruncated: zero factors keep every module at rank 2r
                lora_a.append(torch.zeros_like(adapter.lora_A))
                lora_b.append(torch.zeros_like(adapter.lora_B))
            # PEFT keeps (r × in) / (out × r) factors for fan_in_fan_out (Conv1D) layers too: no transpose needed.
            tensors[prefix + "lora_A.weight"] = torch.cat(lora_a, 0)
            tensors[prefix + "lora_B.weight"] = torch.cat(lora_b, 1)
        paths.append(module_path)
    rank = config.r if format == "kasa" else (2 * config.r if config.uses_truncation else config.r)
    transposed = any(fan_in_fan_out(layer.base_layer) for _, layer in kasa_model.kasa_layers())
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=config.lora_alpha if format == "kasa" else rank,  # "lora": scaling 1, everything is in B'
        lora_dropout=config.lora_dropout if format == "kasa" else 0.0,
        # An anchored regex of the exact paths: PEFT matches a list by suffix, so a list would also adapt any
        # unadapted module whose path ends with an adapted one's (e.g. "encoder.proj" for "proj").
        target_modules=exact_paths_regex(paths),
        fan_in_fan_out=transposed,
        kasa_config=PeftKasaConfig(beta=config.beta, gamma=config.gamma) if format == "kasa" else None,
        base_model_name_or_path=config.base_model_name_or_path,
    )
    save_directory = Path(save_directory)
    checkpoint.save_tensors_atomic(
        {k: v.detach().float() for k, v in tensors.items()}, save_directory / PEFT_WEIGHTS_NAME, {"format": "pt"}
    )
    checkpoint.atomic_write_text(save_directory / PEFT_CONFIG_NAME, json.dumps(peft_config.to_dict(), indent=2, default=list))
