"""Every compared method builds on a tiny model, trains only what it should, and starts where it should."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kasa_peft.experiments.methods import METHODS, AdapterSettings, kasa_sigma_by_layer, prepare_model


def _bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


INPUTS = {"input_ids": torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))}
SETTINGS = AdapterSettings(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])


@pytest.mark.parametrize("method", METHODS)
def test_method_builds_and_trains_the_right_parameters(method):
    original = _bert()
    prepared = prepare_model(copy.deepcopy(original), method, SETTINGS)
    trainable = [n for n, p in prepared.model.named_parameters() if p.requires_grad]
    total = sum(p.numel() for p in prepared.model.parameters())
    count = sum(p.numel() for n, p in prepared.model.named_parameters() if p.requires_grad)
    if method == "full":
        assert count == total
    else:
        assert 0 < count < total / 2
        assert any("classifier" in n for n in trainable), "the task head must train"
    out = prepared.model(**INPUTS).logits
    base = original(**INPUTS).logits
    # Which methods start exactly at the pretrained function? LoRA-family with B=0 and the SVD re-splits (PiSSA/MiLoRA)
    # do, up to the (identically re-initialised) classifier copy; KaSA starts at the truncated base.
    if method in ("lora", "dora", "pissa", "milora", "full"):
        torch.testing.assert_close(out, base, rtol=1e-4, atol=1e-4)
    else:
        assert not torch.allclose(out, base, atol=1e-6)
    if prepared.regularizer is not None:
        assert torch.isfinite(prepared.regularizer(prepared.model))


def test_kasa_and_peft_kasa_start_from_the_same_truncated_model():
    original = _bert()
    ours = prepare_model(copy.deepcopy(original), "kasa", SETTINGS).model(**INPUTS).logits
    theirs = prepare_model(copy.deepcopy(original), "peft-kasa", SETTINGS).model(**INPUTS).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_sigma_report_only_for_kasa():
    kasa = prepare_model(_bert(), "kasa", SETTINGS).model
    sigma = kasa_sigma_by_layer(kasa)
    assert len(sigma) == 4 and all(len(v) == 4 for v in sigma.values())
    assert kasa_sigma_by_layer(prepare_model(_bert(), "lora", SETTINGS).model) == {}


def test_unknown_method():
    with pytest.raises(ValueError, match="choose from"):
        prepare_model(_bert(), "adalora", SETTINGS)
