"""Tiny LLaMA checkpoints loaded through transformers' BitsAndBytesConfig on the CPU (bitsandbytes >= 0.48)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

# nf4/fp4 × double quantisation, and LLM.int8 — every bitsandbytes base KaSA supports.
VARIANTS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "nf4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "fp4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}
# The registered base-layer kind (kasa_peft.base_layers.KINDS) each variant loads as.
VARIANT_KINDS = {"nf4": "bnb-4bit", "nf4-dq": "bnb-4bit", "fp4": "bnb-4bit", "fp4-dq": "bnb-4bit", "int8": "bnb-8bit"}
TARGETS = ["q_proj", "v_proj", "down_proj"]


def save_tiny_llama(directory: Path, seed: int = 0) -> Path:
    # Feature sizes are multiples of 64, the 4-bit block size: bitsandbytes' CPU inference kernel needs that.
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def load_quantized(directory: Path, variant: str) -> LlamaForCausalLM:
    quantization = BitsAndBytesConfig(**VARIANTS[variant], bnb_4bit_compute_dtype=torch.float32)
    # bitsandbytes logs a missing optional CPU kernel package and a per-call int8 cast note; neither matters here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(directory, quantization_config=quantization, device_map="cpu",
                                                 dtype=torch.float32)
    return model.eval()


def token_inputs() -> dict:
    return {"input_ids": torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))}


def dequantized_reference(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight from bitsandbytes' own dequantisers (written out here, independent of kasa_peft)."""
    import bitsandbytes.functional as bnb_functional

    weight = layer.weight
    if hasattr(weight, "quant_state"):
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float64)
    return weight.CB.to(torch.float64) * weight.SCB.to(torch.float64)[:, None] / 127.0
