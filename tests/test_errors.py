"""Bad input fails early with a message that names the fix, and leaves the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from _factories import CASES

from kasa_peft import KasaConfig, KasaModel, get_kasa_model
from kasa_peft.layer import KasaLayer

LLAMA = CASES[0]


def _untouched(model, original) -> bool:
    return not any(isinstance(m, KasaLayer) for m in model.modules()) and all(
        torch.equal(model.state_dict()[k], v) for k, v in original.state_dict().items()
    )


def test_rank_too_large_names_module_and_limit():
    original = LLAMA.build()
    model = copy.deepcopy(original)
    # k_proj is 16×32 here (out < in), so r=16 is too large for it but fine for q_proj (32×32).
    with pytest.raises(ValueError, match=r"k_proj.*16×32.*r <= 15"):
        get_kasa_model(model, KasaConfig(r=16, target_modules=["q_proj", "k_proj"]))
    assert _untouched(model, original)


@pytest.mark.parametrize("r", [0, -2, 1.5])
def test_invalid_rank_in_config(r):
    with pytest.raises(ValueError, match="positive integer"):
        KasaConfig(r=r, target_modules=["q_proj"])


def test_no_target_match_lists_candidates():
    model = LLAMA.build()
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        get_kasa_model(model, KasaConfig(r=2, target_modules=["query"]))


def test_unsupported_layer_type_is_named():
    model = LLAMA.build()
    with pytest.raises(TypeError, match=r"embed_tokens \(Embedding\)"):
        get_kasa_model(model, KasaConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    assert not any(isinstance(m, KasaLayer) for m in model.modules())


def test_non_finite_weights_rejected_before_any_change():
    original = LLAMA.build()
    model = copy.deepcopy(original)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("inf")
    snapshot = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj.*NaN/Inf"):
        get_kasa_model(model, KasaConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert _untouched(model, snapshot)


def test_meta_weights_need_a_saved_adapter():
    with torch.device("meta"):
        model = LLAMA.build()
    with pytest.raises(ValueError, match="meta device"):
        get_kasa_model(model, KasaConfig(r=2, target_modules=["q_proj"]))


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="kasa_config.json"):
        KasaModel.from_pretrained(LLAMA.build(), tmp_path / "nowhere")


def test_checkpoint_for_another_base_model_is_refused(tmp_path):
    model = get_kasa_model(LLAMA.build(), KasaConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    torch.manual_seed(99)
    other = type(LLAMA.build())(LLAMA.build().config)  # same shapes, different weights
    with pytest.raises(ValueError, match="different base model"):
        KasaModel.from_pretrained(other, tmp_path)
    # Same weights in bf16 still load (fingerprints tolerate dtype round-off).
    KasaModel.from_pretrained(LLAMA.build().to(torch.bfloat16), tmp_path)


def test_checkpoint_with_other_targets_or_shapes_is_refused(tmp_path):
    model = get_kasa_model(LLAMA.build(), KasaConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    bigger = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="does not fit this model"):
        KasaModel.from_pretrained(bigger, tmp_path, check_base_weights=False)
    deeper = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="absent from the checkpoint"):
        KasaModel.from_pretrained(deeper, tmp_path, check_base_weights=False)


def test_unknown_adapter_and_bad_names():
    model = get_kasa_model(LLAMA.build(), KasaConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Unknown adapter"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="no '.'"):
        model.add_adapter("a.b", KasaConfig(r=2, target_modules=["q_proj"]))


def test_unsupported_peft_lora_options_are_refused():
    import peft

    model = get_kasa_model(LLAMA.build(), KasaConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="use_dora"):
        model.add_adapter("dora", peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))


def test_save_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact and no temp files behind."""
    model = get_kasa_model(LLAMA.build(), KasaConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        for _, layer in model.kasa_layers():
            layer.kasa_adapters["default"].lora_B.fill_(1.0)
    import kasa_peft.checkpoint as ckpt

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_all_linear_skips_task_heads():
    bert = CASES[2].build()
    model = get_kasa_model(bert, KasaConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]))
    targeted = [name for name, _ in model.kasa_layers()]
    assert targeted and not any("classifier" in name for name in targeted)
    assert "bert.pooler.dense" in targeted
    llama = get_kasa_model(CASES[0].build(), KasaConfig(r=4, target_modules="all-linear"))
    assert not any("lm_head" in name for name, _ in llama.kasa_layers())
