"""kasa_peft: KaSA (Knowledge-Aware Singular-Value Adaptation, arXiv 2412.06071) for PyTorch and Hugging Face.

Quick start::

    from kasa_peft import KasaConfig, get_kasa_model
    model = get_kasa_model(model, KasaConfig(r=8, target_modules=["q_proj", "v_proj"]))
    loss = model(**batch).loss + model.regularization_loss()
"""

from .config import KasaConfig
from .interop import export_peft_checkpoint
from .layer import KasaAdapter, KasaLayer
from .model import KasaModel, get_kasa_model
from .regularization import kasa_regularization
from .spectral import MinorComponents, truncate_many, truncate_minor_components

__version__ = "0.1.0"

__all__ = [
    "KasaAdapter",
    "KasaConfig",
    "KasaLayer",
    "KasaModel",
    "KasaTrainer",
    "MinorComponents",
    "export_peft_checkpoint",
    "get_kasa_model",
    "kasa_regularization",
    "truncate_many",
    "truncate_minor_components",
]


def __getattr__(name: str):
    # The Trainer import pulls in most of transformers' training stack; only pay for it when it is used.
    if name == "KasaTrainer":
        from .trainer import KasaTrainer

        return KasaTrainer
    raise AttributeError(f"module 'kasa_peft' has no attribute {name!r}")
