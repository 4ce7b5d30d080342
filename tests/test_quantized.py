"""KaSA on bitsandbytes bases (Linear4bit nf4/fp4 ± double quantisation, Linear8bitLt), on the CPU.

References: the float64 SVD of bitsandbytes' own dequantisation of each weight, the quantised model itself, and the
formula ``y = base(x) − W_minor·x + ΔW·x``.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from _quantized import (
    TARGETS,
    VARIANT_KINDS,
    VARIANTS,
    dequantized_reference,
    load_quantized,
    save_tiny_llama,
    token_inputs,
)
from kasa_peft import KasaConfig, KasaModel, get_kasa_model
from kasa_peft.base_layers import KINDS, kind_of, require_bitsandbytes

bnb = pytest.importorskip("bitsandbytes", reason='bitsandbytes is not installed: pip install "kasa-peft[quant]"')


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _config(**overrides) -> KasaConfig:
    return KasaConfig(**{"r": 3, "lora_alpha": 6, "target_modules": TARGETS, **overrides})


def _packed_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight.data.clone() for name, module in model.named_modules()
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def _randomize_adapters(model: KasaModel, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.kasa_layers():
            for adapter in layer.kasa_adapters.values():
                adapter.lora_B.copy_(0.1 * torch.randn(adapter.lora_B.shape, generator=generator))


def test_every_quantised_kind_is_loaded_by_a_variant():
    """Adding a quantised kind to the registry means adding the variants that load it here."""
    assert set(VARIANT_KINDS) == set(VARIANTS)
    assert set(VARIANT_KINDS.values()) == {kind.name for kind in KINDS if kind.quantized}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_truncation_comes_from_the_dequantised_weight_and_the_base_stays_packed(checkpoint_dir, variant):
    model = load_quantized(checkpoint_dir, variant)
    packed_before = _packed_weights(model)
    kasa = get_kasa_model(model, _config())
    layers = dict(kasa.kasa_layers())
    assert len(layers) == 2 * len(TARGETS)
    for name, layer in layers.items():
        assert kind_of(layer.base_layer).name == VARIANT_KINDS[variant], name
        u, s, vh = torch.linalg.svd(dequantized_reference(layer.base_layer), full_matrices=False)
        reference_minor = (u[:, -3:] * s[-3:]) @ vh[-3:]
        adapter = layer.kasa_adapters["default"]
        assert adapter.lora_A.dtype == torch.float32
        minor = adapter.minor_u_sigma.double() @ adapter.minor_vh.double()
        torch.testing.assert_close(minor, reference_minor, atol=1e-5, rtol=1e-4)
    packed_after = {name.replace(".base_layer", ""): w for name, w in _packed_weights(kasa.base_model).items()}
    assert packed_after.keys() == packed_before.keys()
    assert all(torch.equal(packed_after[name], packed_before[name]) for name in packed_before)


@pytest.mark.parametrize("variant", ["nf4-dq", "int8"])
def test_forward_is_base_minus_minor_plus_update(checkpoint_dir, variant):
    kasa = get_kasa_model(load_quantized(checkpoint_dir, variant), _config())
    _randomize_adapters(kasa)
    layer = kasa.base_model.model.layers[0].self_attn.q_proj
    adapter = layer.kasa_adapters["default"]
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(2))
    u, s, vh = torch.linalg.svd(dequantized_reference(layer.base_layer), full_matrices=False)
    w_minor = (u[:, -3:] * s[-3:]) @ vh[-3:]
    delta = adapter.scaling * adapter.lora_B.double() @ torch.diag(adapter.sigma.double()) @ adapter.lora_A.double()
    expected = layer.base_layer(x).double() + x.double() @ (delta - w_minor).T
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-4, rtol=1e-4)


def test_adapter_can_use_the_compute_dtype_the_user_picks(checkpoint_dir):
    inputs = token_inputs()
    kasa = get_kasa_model(load_quantized(checkpoint_dir, "nf4"), _config())
    _randomize_adapters(kasa)
    kasa.train()
    with torch.no_grad():
        in_float32 = kasa(**inputs).logits
        kasa.cast_adapter(torch.bfloat16)
        in_bfloat16 = kasa(**inputs).logits
    adapter = kasa.base_model.model.layers[0].self_attn.q_proj.kasa_adapters["default"]
    assert adapter.lora_A.dtype == adapter.minor_vh.dtype == torch.bfloat16
    assert in_bfloat16.dtype == torch.float32  # the base's output dtype
    torch.testing.assert_close(in_bfloat16, in_float32, atol=2e-2, rtol=2e-2)
    assert not torch.equal(in_bfloat16, in_float32)


@pytest.mark.parametrize("variant", ["nf4", "fp4-dq", "int8"])
def test_disable_and_unload_give_the_quantised_models_outputs_exactly(checkpoint_dir, variant):
    inputs = token_inputs()
    model = load_quantized(checkpoint_dir, variant)
    with torch.no_grad():
        original = model(**inputs).logits
    kasa = get_kasa_model(model, _config())
    _randomize_adapters(kasa)
    with torch.no_grad():
        adapted = kasa(**inputs).logits
        with kasa.disable_adapter():
            disabled = kasa(**inputs).logits
        assert not torch.allclose(adapted, original)
        assert torch.equal(disabled, original)
        assert torch.equal(kasa.unload()(**inputs).logits, original)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dense_weight_reads_bitsandbytes_cpu_layout(checkpoint_dir, double_quant):
    """After a no-grad forward, bitsandbytes keeps 4-bit weights in a repacked CPU layout with bf16 block scales."""
    from kasa_peft.base_layers import weight_matrix

    layer = load_quantized(checkpoint_dir, "nf4-dq" if double_quant else "nf4").model.layers[0].mlp.down_proj
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes keeps its standard 4-bit layout (read elsewhere)")
    before = dequantized_reference(layer)
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        layer(x)
        assert layer.weight.quant_state.packing_format_for_cpu
        after = weight_matrix(layer).double()
        # Only the block scales moved (to bf16), so the weight changes by < 1 % and is what the layer computes with.
        torch.testing.assert_close(after, before, atol=0, rtol=1e-2)
        assert not torch.equal(after, before)
        torch.testing.assert_close(layer(x).double(), x.double() @ after.T, atol=2e-2, rtol=2e-2)
    assert layer.weight.quant_state.packing_format_for_cpu  # reading it left the layer as it was


def test_dense_weight_of_int8_survives_the_first_forward(checkpoint_dir):
    """bitsandbytes moves an int8 layer's row scales from the parameter to the layer state on the first forward."""
    from kasa_peft.base_layers import weight_matrix

    layer = load_quantized(checkpoint_dir, "int8").model.layers[0].mlp.down_proj
    before = dequantized_reference(layer)
    with torch.no_grad():
        layer(torch.randn(3, layer.in_features))
    torch.testing.assert_close(weight_matrix(layer).double(), before, atol=0, rtol=1e-6)  # float32 vs float64 scaling


def test_training_reaches_only_the_adapters(checkpoint_dir):
    kasa = get_kasa_model(load_quantized(checkpoint_dir, "nf4"), _config(beta=1e-2, gamma=1e-2))
    # Train mode, as a Trainer sets it: in eval mode bitsandbytes repacks 4-bit weights for its CPU inference kernel,
    # which has no backward.
    kasa.train()
    inputs = token_inputs()
    packed_before = _packed_weights(kasa.base_model)
    trainable = [p for p in kasa.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):
        loss = kasa(**inputs, labels=inputs["input_ids"]).loss + kasa.regularization_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(layer.kasa_adapters["default"].lora_B.abs().sum() > 0 for _, layer in kasa.kasa_layers())
    after = _packed_weights(kasa.base_model)
    assert all(torch.equal(after[k], packed_before[k]) for k in after)


def test_merge_refuses_without_dtype_and_dequantises_with_one(checkpoint_dir):
    inputs = token_inputs()
    kasa = get_kasa_model(load_quantized(checkpoint_dir, "nf4"), _config())
    _randomize_adapters(kasa)
    kasa.train()  # bitsandbytes' float32 dequantise-then-matmul path (its CPU inference kernel rounds to bf16)
    with torch.no_grad():
        adapted = kasa(**inputs).logits
    with pytest.raises(ValueError, match="quantised"):
        kasa.merge_adapter()
    with pytest.raises(ValueError, match=r"merge_and_unload\(dtype="):
        kasa.merge_and_unload()
    merged = kasa.merge_and_unload(dtype=torch.float32)
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
    assert isinstance(merged.model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)  # untargeted: left as loaded
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["nf4-dq", "int8"])
def test_save_and_load_onto_a_freshly_quantised_base(checkpoint_dir, tmp_path, variant):
    inputs = token_inputs()
    kasa = get_kasa_model(load_quantized(checkpoint_dir, variant), _config())
    _randomize_adapters(kasa)
    with torch.no_grad():
        adapted = kasa(**inputs).logits
    kasa.save_pretrained(tmp_path / "adapter")
    loaded = KasaModel.from_pretrained(load_quantized(checkpoint_dir, variant), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, adapted)


def test_fingerprint_rejects_a_different_quantised_base(checkpoint_dir, tmp_path):
    kasa = get_kasa_model(load_quantized(checkpoint_dir, "nf4"), _config())
    kasa.save_pretrained(tmp_path / "adapter")
    other = load_quantized(save_tiny_llama(tmp_path / "other", seed=1), "nf4")
    with pytest.raises(ValueError, match="different base model"):
        KasaModel.from_pretrained(other, tmp_path / "adapter")


def _fake_quant_layer(class_name: str, module: str) -> nn.Module:
    cls = type(class_name, (nn.Module,), {"forward": lambda self, x: x})
    cls.__module__ = module
    layer = cls()
    layer.register_buffer("qweight", torch.zeros(4, 8, dtype=torch.int32))
    return layer


@pytest.mark.parametrize(
    ("class_name", "module"),
    [("QuantLinear", "auto_gptq.nn_modules.qlinear.qlinear_cuda"), ("WQLinear_GEMM", "awq.modules.linear.gemm"),
     ("HQQLinear", "hqq.core.quantize")],
)
@pytest.mark.parametrize("targets", [["proj"], "all-linear"])
def test_other_quantised_layers_fail_naming_their_type(class_name, module, targets):
    model = nn.Sequential()
    model.add_module("dense", nn.Linear(8, 8))
    model.add_module("proj", _fake_quant_layer(class_name, module))
    with pytest.raises(TypeError, match=rf"'proj'.*{class_name}"):
        get_kasa_model(model, KasaConfig(r=2, target_modules=targets))


def test_a_linear_with_integer_weights_is_refused():
    layer = nn.Linear(8, 8)
    layer.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="torch.int8"):
        get_kasa_model(nn.Sequential(layer), KasaConfig(r=2, target_modules=["0"]))


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"kasa-peft\[quant\]"):
        require_bitsandbytes()
