"""The property matrix every KaSA model passes (in the spirit of PEFT's tests/testing_common.py)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from _factories import CASE_IDS, CASES, ModelCase

import kasa_peft.base_layers.access as base_layers_access
import kasa_peft.model as kasa_model_module
from kasa_peft import KasaConfig, KasaModel, get_kasa_model
from kasa_peft.base_layers import KINDS, kind_of, weight_matrix
from kasa_peft.layer import KasaLayer
from kasa_peft.spectral import minor_components_svd

R = 4


def _config(case: ModelCase, **overrides) -> KasaConfig:
    return KasaConfig(r=R, lora_alpha=8, target_modules=case.target_modules, modules_to_save=case.modules_to_save, **overrides)


def _perturb_adapters(model: KasaModel, seed: int = 0) -> None:
    """Give B (zero at init) and σ random values so ΔW ≠ 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.kasa_layers():
            for adapter in layer.kasa_adapters.values():
                adapter.lora_B.copy_(0.1 * torch.randn(adapter.lora_B.shape, generator=generator))
                if adapter.sigma is not None:
                    adapter.sigma.copy_(torch.randn(adapter.sigma.shape, generator=generator))


def _truncated_reference(original: torch.nn.Module, target_paths: list[str]) -> torch.nn.Module:
    """The original model with each targeted W replaced by W − U_rΣ_rV_rᵀ from a float64 full SVD."""
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for path in target_paths:
            layer = reference.get_submodule(path)
            w = weight_matrix(layer)
            dropped = minor_components_svd(w, R).product().to(w.dtype)
            w.sub_(dropped)  # weight_matrix is a view for Conv1D, so this writes through
    return reference


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request) -> ModelCase:
    return request.param


def test_the_matrix_covers_every_dense_kind():
    """Every kind that can be merged into in place runs this whole matrix (quantised kinds: tests/test_quantized.py)."""
    covered = set()
    for case in CASES:
        model = get_kasa_model(case.build(), _config(case))
        covered |= {kind_of(layer.base_layer).name for _, layer in model.kasa_layers()}
    assert covered >= {kind.name for kind in KINDS if not kind.quantized and kind.name != "unsupported"}


def test_init_equals_truncated_base(case):
    original = case.build()
    inputs = case.make_inputs()
    before = case.output(original, inputs)
    model = get_kasa_model(copy.deepcopy(original), _config(case))
    paths = [name for name, _ in model.kasa_layers()]
    expected = case.output(_truncated_reference(original, paths), inputs)
    got = case.output(model, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, before, atol=1e-4), "truncation should change the output"


def test_disable_adapter_is_bit_exact(case):
    original = case.build()
    inputs = case.make_inputs()
    before = case.output(original, inputs)
    model = get_kasa_model(copy.deepcopy(original), _config(case))
    _perturb_adapters(model)
    with model.disable_adapter():
        assert torch.equal(case.output(model, inputs), before)
    assert not torch.equal(case.output(model, inputs), before)


def test_unload_returns_the_original_model(case):
    original = case.build()
    inputs = case.make_inputs()
    model = get_kasa_model(copy.deepcopy(original), _config(case))
    _perturb_adapters(model)
    restored = model.unload()
    assert torch.equal(case.output(restored, inputs), case.output(original, inputs))
    assert restored.state_dict().keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert not any(isinstance(m, KasaLayer) for m in restored.modules())


def test_merge_equals_unmerged_and_unmerge_restores(case):
    original = case.build()
    inputs = case.make_inputs()
    model = get_kasa_model(copy.deepcopy(original), _config(case))
    _perturb_adapters(model)
    unmerged = case.output(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(case.output(model, inputs), unmerged, rtol=1e-4, atol=1e-5)
    model.merge_adapter()  # idempotent: warns, does not merge twice
    torch.testing.assert_close(case.output(model, inputs), unmerged, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(case.output(model, inputs), unmerged, rtol=1e-4, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(case.output(model, inputs), case.output(original, inputs), rtol=1e-5, atol=1e-6)


def test_merge_and_unload(case):
    original = case.build()
    inputs = case.make_inputs()
    model = get_kasa_model(copy.deepcopy(original), _config(case))
    _perturb_adapters(model)
    expected = case.output(model, inputs)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, KasaLayer) for m in merged.modules())
    torch.testing.assert_close(case.output(merged, inputs), expected, rtol=1e-4, atol=1e-5)


def test_save_load_roundtrip_needs_no_svd(case, tmp_path, monkeypatch):
    original = case.build()
    inputs = case.make_inputs()
    model = get_kasa_model(copy.deepcopy(original), _config(case))
    _perturb_adapters(model)
    expected = case.output(model, inputs)
    model.save_pretrained(tmp_path)

    def no_svd(*args, **kwargs):
        raise AssertionError("loading a saved adapter must not run a truncation")

    # The truncation runs through model.plan_truncation → base_layers.access.truncate_layers → truncate_many.
    monkeypatch.setattr(base_layers_access, "truncate_many", no_svd)
    monkeypatch.setattr(kasa_model_module, "plan_truncation", no_svd)
    torch.manual_seed(1234)  # a different seed must not matter on reload
    loaded = KasaModel.from_pretrained(copy.deepcopy(original), tmp_path)
    assert torch.equal(case.output(loaded, inputs), expected)
    assert not any(p.requires_grad for p in loaded.parameters()), "inference load must freeze everything"
    trainable = KasaModel.from_pretrained(copy.deepcopy(original), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_low_cpu_mem_usage_load(case, tmp_path):
    original = case.build()
    inputs = case.make_inputs()
    model = get_kasa_model(copy.deepcopy(original), _config(case))
    _perturb_adapters(model)
    expected = case.output(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = KasaModel.from_pretrained(copy.deepcopy(original), tmp_path, low_cpu_mem_usage=True)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert torch.equal(case.output(loaded, inputs), expected)


def test_only_adapter_parameters_train(case):
    model = get_kasa_model(case.build(), _config(case))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        assert ".kasa_adapters.default." in name or ".copies.default." in name, name
    assert not any("minor" in name for name, _ in model.named_parameters()), "truncation factors must be buffers"


def test_gradients_reach_a_b_and_sigma(case):
    model = get_kasa_model(case.build(), _config(case))
    _perturb_adapters(model)
    model.train()
    out = case.output(model, case.make_inputs())
    (out.float().square().mean() + model.regularization_loss()).backward()
    for _, layer in model.kasa_layers():
        adapter = layer.kasa_adapters["default"]
        for param in (adapter.lora_A, adapter.lora_B, adapter.sigma):
            assert param.grad is not None and param.grad.abs().sum() > 0
    frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_grads


def test_kasa_and_plain_lora_adapters_share_a_model(case):
    original = case.build()
    inputs = case.make_inputs()
    kasa_only = get_kasa_model(copy.deepcopy(original), _config(case))
    _perturb_adapters(kasa_only, seed=1)
    model = get_kasa_model(copy.deepcopy(original), _config(case))
    model.load_state_dict(kasa_only.state_dict())
    lora = peft.LoraConfig(r=3, lora_alpha=6, target_modules=case.target_modules)
    model.add_adapter("lora", lora)
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("lora", lora)
    # Give the LoRA adapter a non-zero B, and compare with PEFT's own LoRA holding the same tensors.
    peft_model = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(r=3, lora_alpha=6, target_modules=case.target_modules))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for path, layer in model.kasa_layers():
            adapter = layer.kasa_adapters["lora"]
            adapter.lora_B.copy_(0.1 * torch.randn(adapter.lora_B.shape, generator=generator))
            peft_layer = peft_model.base_model.model.get_submodule(path)
            peft_layer.lora_A["default"].weight.copy_(adapter.lora_A)
            peft_layer.lora_B["default"].weight.copy_(adapter.lora_B)
    model.set_adapter("lora")
    torch.testing.assert_close(case.output(model, inputs), case.output(peft_model, inputs), rtol=1e-5, atol=1e-6)
    model.set_adapter("default")
    assert torch.equal(case.output(model, inputs), case.output(kasa_only, inputs))
    with model.disable_adapter():
        assert torch.equal(case.output(model, inputs), case.output(original, inputs))
    assert float(model.regularization_loss("lora")) == 0.0
    model.delete_adapter("lora")
    assert list(model.peft_config) == ["default"]
    assert torch.equal(case.output(model, inputs), case.output(kasa_only, inputs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(case, dtype):
    original = case.build().to(dtype)
    inputs = case.make_inputs()
    if "x" in inputs:
        inputs = {"x": inputs["x"].to(dtype)}
    before = case.output(original, inputs)
    model = get_kasa_model(copy.deepcopy(original), _config(case))
    with model.disable_adapter():
        assert torch.equal(case.output(model, inputs), before)
    _perturb_adapters(model)
    out = case.output(model, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    model.merge_adapter()
    torch.testing.assert_close(case.output(model, inputs), out, rtol=5e-2, atol=5e-2)
    restored = model.unload()  # unmerges first
    torch.testing.assert_close(case.output(restored, inputs), before, rtol=2e-2, atol=2e-2)


def test_state_dict_keys_are_stable(tmp_path):
    case = CASES[0]
    model = get_kasa_model(case.build(), KasaConfig(r=2, target_modules=["q_proj"]))
    keys = {k for k in model.state_dict() if "layers.0.self_attn.q_proj" in k}
    assert keys == {
        "base_model.model.layers.0.self_attn.q_proj.base_layer.weight",
        "base_model.model.layers.0.self_attn.q_proj.kasa_adapters.default.lora_A",
        "base_model.model.layers.0.self_attn.q_proj.kasa_adapters.default.lora_B",
        "base_model.model.layers.0.self_attn.q_proj.kasa_adapters.default.sigma",
        "base_model.model.layers.0.self_attn.q_proj.kasa_adapters.default.minor_u_sigma",
        "base_model.model.layers.0.self_attn.q_proj.kasa_adapters.default.minor_vh",
    }
    assert set(model.adapter_state_dict()) == {
        f"model.layers.{i}.self_attn.q_proj.{t}" for i in range(2) for t in ("lora_A", "lora_B", "sigma", "minor_u_sigma", "minor_vh")
    }


def test_modules_to_save_get_a_private_copy():
    case = CASES[2]  # BERT with a classifier head
    original = case.build()
    inputs = case.make_inputs()
    model = get_kasa_model(copy.deepcopy(original), _config(case))
    head = model.base_model.classifier
    with torch.no_grad():
        head.copies["default"].weight.add_(1.0)
    assert head.copies["default"].weight.requires_grad
    assert not head.original_module.weight.requires_grad
    with model.disable_adapter():
        assert torch.equal(case.output(model, inputs), case.output(original, inputs))
    unloaded = model.unload()
    assert torch.equal(unloaded.classifier.weight, original.classifier.weight)


def test_gradient_checkpointing_trains_adapters():
    case = CASES[0]
    model = get_kasa_model(case.build(), _config(case))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    _perturb_adapters(model)
    out = model(**case.make_inputs(), labels=case.make_inputs()["input_ids"])
    out.loss.backward()
    grads = [layer.kasa_adapters["default"].lora_A.grad for _, layer in model.kasa_layers()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_adapter_forward_has_no_graph_breaks():
    layer_model = get_kasa_model(CASES[3].build(), KasaConfig(r=2, target_modules=["lin0"]))
    layer = layer_model.base_model.lin0
    explanation = torch._dynamo.explain(layer)(torch.randn(3, 12))
    assert explanation.graph_break_count == 0


def test_fused_and_unfused_adapter_paths_agree():
    """Dropout 0 takes the fused rank-2r path; a Dropout module (identity in eval) takes the two-term path."""
    from kasa_peft.layer import KasaAdapter

    fused = KasaAdapter(12, 20, 3, 6.0, 0.0)
    unfused = KasaAdapter(12, 20, 3, 6.0, 0.5)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in ("lora_A", "lora_B", "sigma", "minor_u_sigma", "minor_vh"):
            value = torch.randn(getattr(fused, tensor).shape, generator=generator)
            getattr(fused, tensor).copy_(value)
            getattr(unfused, tensor).copy_(value)
    unfused.eval()
    x = torch.randn(4, 12, generator=generator)
    torch.testing.assert_close(fused(x), unfused(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused(x), x @ fused.delta_weight().T, rtol=1e-5, atol=1e-5)


def test_several_adapters_save_and_load_by_name(tmp_path):
    case = CASES[0]
    original = case.build()
    inputs = case.make_inputs()
    model = get_kasa_model(copy.deepcopy(original), _config(case))
    model.add_adapter("other", KasaConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    _perturb_adapters(model, seed=3)
    outputs = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        outputs[name] = case.output(model, inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "kasa_config.json").is_file() and (tmp_path / "other" / "kasa_config.json").is_file()
    loaded = KasaModel.from_pretrained(copy.deepcopy(original), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert torch.equal(case.output(loaded, inputs), outputs["default"])
    loaded.set_adapter("other")
    assert torch.equal(case.output(loaded, inputs), outputs["other"])
    with pytest.raises(ValueError, match="already exists"):
        loaded.load_adapter(tmp_path / "other", adapter_name="other")
