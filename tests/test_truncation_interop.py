"""Adapters with modules kept untruncated (guard 'skip') export to PEFT exactly as LoRA, and refuse PEFT's KaSA."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from _factories import CASES

from kasa_peft import KasaConfig, export_peft_checkpoint, get_kasa_model

LLAMA = CASES[0]


def test_skipped_modules_export_as_exact_lora_and_not_as_peft_kasa(tmp_path):
    original = LLAMA.build()
    inputs = LLAMA.make_inputs()
    config = KasaConfig(r=4, target_modules=["q_proj", "v_proj"], truncation_guard="off",
                        truncation_skipped_modules=["model.layers.0.self_attn.v_proj"])
    ours = get_kasa_model(copy.deepcopy(original), config)
    with torch.no_grad():
        for _, layer in ours.kasa_layers():
            layer.kasa_adapters["default"].lora_B.normal_(std=0.1)
    expected = ours(**inputs).logits
    with pytest.raises(ValueError, match="format='lora'"):
        export_peft_checkpoint(ours, tmp_path / "kasa", format="kasa")
    export_peft_checkpoint(ours, tmp_path / "lora", format="lora")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "lora").eval()
    torch.testing.assert_close(theirs(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
