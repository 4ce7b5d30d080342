"""kasa_peft: KaSA (Knowledge-Aware Singular-Value Adaptation, arXiv 2412.06071) for PyTorch and Hugging Face.

Quick start::

    from kasa_peft import KasaConfig, get_kasa_model
    model = get_kasa_model(model, KasaConfig(r=8, target_modules=["q_proj", "v_proj"]))
    loss = model(**batch).loss + model.regularization_loss()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> submodule. Imported on first access (PEP 562), so that ``import kasa_peft.experiments.cli`` does not
# pull in torch/transformers/huggingface_hub before the CLI has set its offline defaults (huggingface_hub reads
# HF_HUB_OFFLINE once, at import), and ``kasa --help`` starts without the deep-learning stack.
_EXPORTS = {
    "KasaConfig": "config",
    "export_peft_checkpoint": "interop",
    "KasaAdapter": "layer",
    "KasaLayer": "layer",
    "KasaModel": "model",
    "get_kasa_model": "model",
    "kasa_regularization": "regularization",
    "MinorComponents": "spectral",
    "truncate_many": "spectral",
    "truncate_minor_components": "spectral",
    "KasaTrainer": "trainer",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # static analysers see the eager imports
    from .config import KasaConfig
    from .interop import export_peft_checkpoint
    from .layer import KasaAdapter, KasaLayer
    from .model import KasaModel, get_kasa_model
    from .regularization import kasa_regularization
    from .spectral import MinorComponents, truncate_many, truncate_minor_components
    from .trainer import KasaTrainer


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kasa_peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
