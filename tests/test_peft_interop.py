"""Interop with PEFT's own KaSA (peft >= 0.21): both directions, and where PEFT behaves differently."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.tuners.lora import KasaConfig as PeftKasaConfig
from _factories import CASES

from kasa_peft import KasaConfig, KasaModel, export_peft_checkpoint, get_kasa_model

LLAMA = CASES[0]
GPT2 = CASES[1]
TARGETS = ["q_proj", "v_proj", "down_proj", "gate_proj"]


def _peft_kasa(original):
    torch.manual_seed(0)
    model = peft.get_peft_model(
        copy.deepcopy(original),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, kasa_config=PeftKasaConfig(beta=1e-3, gamma=1e-2)),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model.eval()


def _logits(model, inputs):
    return model(**inputs).logits


def test_truncated_init_matches_peft_kasa():
    original = LLAMA.build()
    inputs = LLAMA.make_inputs()
    theirs = peft.get_peft_model(
        copy.deepcopy(original), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, kasa_config=PeftKasaConfig())
    )
    ours = get_kasa_model(copy.deepcopy(original), KasaConfig(r=4, target_modules=TARGETS))
    # At init both are "base minus its r smallest singular triplets" (PEFT: float32 SVD; ours: float64 Gram + eigh).
    torch.testing.assert_close(_logits(ours, inputs), _logits(theirs, inputs), rtol=1e-4, atol=1e-5)


def test_load_a_peft_kasa_checkpoint(tmp_path):
    original = LLAMA.build()
    inputs = LLAMA.make_inputs()
    theirs = _peft_kasa(original)
    expected = _logits(theirs, inputs)
    theirs.save_pretrained(tmp_path)
    ours = KasaModel.from_pretrained(copy.deepcopy(original), tmp_path)
    torch.testing.assert_close(_logits(ours, inputs), expected, rtol=1e-4, atol=1e-5)
    assert ours.peft_config["default"].beta == 1e-3 and ours.peft_config["default"].gamma == 1e-2
    # Where PEFT differs: its disable_adapter() gives the *truncated* base, ours the original.
    with ours.disable_adapter():
        assert torch.equal(_logits(ours, inputs), _logits(original, inputs))
    with theirs.disable_adapter():
        assert not torch.allclose(_logits(theirs, inputs), _logits(original, inputs), atol=1e-4)


@pytest.mark.parametrize("fmt", ["kasa", "lora"])
def test_export_loads_in_peft(tmp_path, fmt):
    original = LLAMA.build()
    inputs = LLAMA.make_inputs()
    ours = get_kasa_model(copy.deepcopy(original), KasaConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        for _, layer in ours.kasa_layers():
            layer.kasa_adapters["default"].lora_B.normal_(std=0.1)
    expected = _logits(ours, inputs)
    export_peft_checkpoint(ours, tmp_path, format=fmt)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path).eval()
    torch.testing.assert_close(_logits(theirs, inputs), expected, rtol=1e-4, atol=1e-5)
    with theirs.disable_adapter():
        restored = _logits(theirs, inputs)
    if fmt == "lora":
        # The rank-2r plain-LoRA export leaves PEFT's base untouched: disabling gives the original model back.
        torch.testing.assert_close(restored, _logits(original, inputs), rtol=0, atol=0)
    else:
        # PEFT's KaSA truncates the base destructively on load: disabling does not give the original back.
        assert not torch.allclose(restored, _logits(original, inputs), atol=1e-4)


def test_conv1d_exports_as_lora_not_kasa(tmp_path):
    original = GPT2.build()
    inputs = GPT2.make_inputs()
    ours = get_kasa_model(copy.deepcopy(original), KasaConfig(r=4, target_modules=["c_attn", "c_fc"]))
    with torch.no_grad():
        for _, layer in ours.kasa_layers():
            layer.kasa_adapters["default"].lora_B.normal_(std=0.1)
    with pytest.raises(ValueError, match="Conv1D"):
        export_peft_checkpoint(ours, tmp_path / "kasa", format="kasa")
    export_peft_checkpoint(ours, tmp_path / "lora", format="lora")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "lora").eval()
    torch.testing.assert_close(_logits(theirs, inputs), _logits(ours, inputs), rtol=1e-4, atol=1e-5)


def test_peft_rejects_what_we_support():
    """The gaps we close, checked against PEFT itself so the claim stays true."""
    with pytest.raises(ValueError, match="Conv1D|fan_in_fan_out"):
        peft.get_peft_model(GPT2.build(), peft.LoraConfig(r=4, target_modules=["c_attn"], kasa_config=PeftKasaConfig()))
    with pytest.raises(ValueError, match="KaSA"):
        model = peft.get_peft_model(LLAMA.build(), peft.LoraConfig(r=4, target_modules=["q_proj"], kasa_config=PeftKasaConfig()))
        model.add_adapter("plain", peft.LoraConfig(r=4, target_modules=["q_proj"]))


def test_peft_loads_an_adapter_onto_a_different_base_silently_we_refuse(tmp_path):
    """PEFT applies a KaSA adapter to any base of the same shapes; ours checks the weight fingerprints."""
    from transformers import LlamaForCausalLM

    original = LLAMA.build()
    torch.manual_seed(1)
    other = LlamaForCausalLM(original.config)
    _peft_kasa(original).save_pretrained(tmp_path / "peft")
    peft.PeftModel.from_pretrained(copy.deepcopy(other), tmp_path / "peft")  # no complaint
    ours = get_kasa_model(copy.deepcopy(original), KasaConfig(r=4, target_modules=TARGETS))
    ours.save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="different base model"):
        KasaModel.from_pretrained(copy.deepcopy(other), tmp_path / "ours")
