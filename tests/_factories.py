"""Tiny random-init models for the property matrix (built from transformers configs; no downloads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


class TinyMLP(nn.Module):
    """Plain torch model: in 12 → 20 → 8 → 3, with an out < in and an out > in layer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 20)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.lin1(self.act(self.lin0(x)))))


@dataclass
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[[], dict]
    target_modules: list[str] | str
    modules_to_save: list[str] | None = None
    conv1d: bool = False

    def output(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        out = model(**inputs)
        return out if isinstance(out, torch.Tensor) else out.logits


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=64, max_position_embeddings=64, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return TinyMLP().eval()


def _token_inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 64, (2, 9), generator=generator)}


def _mlp_inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"x": torch.randn(5, 12, generator=generator)}


CASES = [
    ModelCase("llama", _llama, _token_inputs, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ModelCase("gpt2", _gpt2, _token_inputs, ["c_attn", "c_proj", "c_fc"], conv1d=True),
    ModelCase("bert", _bert, _token_inputs, ["query", "value", "dense"], modules_to_save=["classifier"]),
    ModelCase("mlp", _mlp, _mlp_inputs, ["lin0", "lin1"]),
]
CASE_IDS = [case.name for case in CASES]
