"""Layer-level numerics against hand-written references: dropout placement, dtypes, merge rounding, safe_merge.

Each test here kills one deliberate mistake listed in issue 8 (see tests/mutation/README.md for the check).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from _factories import CASE_IDS, CASES, TinyMLP

from kasa_peft import KasaConfig, get_kasa_model
from kasa_peft.layer import KasaAdapter, KasaLayer


def _random_adapter(in_features=12, out_features=20, r=3, alpha=6.0, dropout=0.0, seed=0, **kwargs) -> KasaAdapter:
    adapter = KasaAdapter(in_features, out_features, r, alpha, dropout, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (adapter.lora_A, adapter.lora_B, adapter.sigma, adapter.minor_u_sigma, adapter.minor_vh):
            if tensor is not None:
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    return adapter


@pytest.mark.parametrize("use_sigma", [True, False], ids=["kasa", "lora"])
def test_dropout_acts_on_the_update_input_only(use_sigma):
    """Training mode, p = 0.5: output = (α/r)·B·diag(σ)·A·dropout(x) − U_rΣ_r·V_rᵀ·x, with dropout's own mask."""
    adapter = _random_adapter(dropout=0.5, use_sigma=use_sigma, truncate=use_sigma).train()
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    got = adapter(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)  # the same RNG draw nn.Dropout makes
    scale = adapter.scaling * (adapter.sigma if use_sigma else 1.0)
    expected = ((dropped @ adapter.lora_A.T) * scale) @ adapter.lora_B.T
    if use_sigma:
        expected = expected - (x @ adapter.minor_vh.T) @ adapter.minor_u_sigma.T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # And the truncation term alone (B = 0) is deterministic: dropout never touches it.
    with torch.no_grad():
        adapter.lora_B.zero_()
    if use_sigma:
        first, second = adapter(x), adapter(x)
        assert torch.equal(first, second)
        torch.testing.assert_close(first, -(x @ adapter.minor_vh.T) @ adapter.minor_u_sigma.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_disabling_merged_adapters_gives_the_original(case):
    """Merged, then disabled: the original output (up to float32 round-off of merge→unmerge), not the merged one."""
    original = case.build()
    inputs = case.make_inputs()
    before = case.output(original, inputs)
    model = get_kasa_model(copy.deepcopy(original), KasaConfig(r=4, target_modules=case.target_modules))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in model.kasa_layers():
            layer.kasa_adapters["default"].lora_B.copy_(0.1 * torch.randn(layer.kasa_adapters["default"].lora_B.shape, generator=generator))
    adapted = case.output(model, inputs)
    assert not torch.allclose(adapted, before, atol=1e-3)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(case.output(model, inputs), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(case.output(model, inputs), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "base_dtype, adapter_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float32), (torch.float64, torch.float64)],
)
def test_adapters_train_in_float32_on_half_precision_bases(base_dtype, adapter_dtype):
    model = get_kasa_model(TinyMLP().to(base_dtype), KasaConfig(r=2, target_modules=["lin0", "lin1"]))
    for _, layer in model.kasa_layers():
        adapter = layer.kasa_adapters["default"]
        assert {t.dtype for t in [*adapter.parameters(), *adapter.buffers()]} == {adapter_dtype}
        assert layer.base_layer.weight.dtype == base_dtype
    x = torch.randn(3, 12, dtype=base_dtype)
    assert model(x).dtype == base_dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_rounds_once_into_half_precision(dtype):
    """The merged weight is round(W + ΔW) from one float32 sum, not round(W + round(ΔW))."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(dtype)
    layer = KasaLayer(base)
    adapter = _random_adapter(64, 48, 4, 8.0, seed=2)
    with torch.no_grad():
        adapter.lora_B.mul_(0.01)
        adapter.minor_u_sigma.mul_(0.01)
    layer.add_adapter("a", adapter)
    layer.active_adapters = ["a"]
    before = base.weight.detach().clone()
    expected = (before.float() + adapter.delta_weight()).to(dtype)
    layer.merge()
    assert torch.equal(base.weight, expected)
    layer.unmerge()
    assert torch.equal(base.weight, (expected.float() - adapter.delta_weight()).to(dtype))


def _overflowing_fp16_layer() -> tuple[KasaLayer, KasaAdapter]:
    """fp16 weight 60000 at [0, 0] and ΔW[0, 0] = 10000: finite in float32, +Inf once stored in float16."""
    base = nn.Linear(4, 4, bias=False).to(torch.float16)
    with torch.no_grad():
        base.weight.zero_()
        base.weight[0, 0] = 60000.0
    adapter = KasaAdapter(4, 4, 1, 1.0, truncate=True)
    with torch.no_grad():
        adapter.lora_A.zero_()
        adapter.lora_A[0, 0] = 1.0
        adapter.lora_B.zero_()
        adapter.lora_B[0, 0] = 10000.0
        adapter.sigma.fill_(1.0)
        adapter.minor_u_sigma.zero_()
        adapter.minor_vh.zero_()
    layer = KasaLayer(base)
    layer.add_adapter("a", adapter)
    layer.active_adapters = ["a"]
    return layer, adapter


def test_safe_merge_checks_the_weight_in_its_own_dtype():
    layer, adapter = _overflowing_fp16_layer()
    assert torch.isfinite(layer.base_layer.weight.float() + adapter.delta_weight()).all()  # fine in float32
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs or Infs.*'a'.*float16"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and layer.merged_adapters == []


def test_safe_merge_refuses_a_nan_adapter_and_leaves_the_weight():
    torch.manual_seed(0)
    layer = KasaLayer(nn.Linear(12, 20))
    adapter = _random_adapter()
    with torch.no_grad():
        adapter.sigma[1] = float("nan")
    layer.add_adapter("a", adapter)
    layer.active_adapters = ["a"]
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs or Infs"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and layer.merged_adapters == []
    layer.merge()  # without safe_merge the caller asked for it
    assert not torch.isfinite(layer.base_layer.weight).all()


def test_deleting_a_merged_adapter_unmerges_only_that_one():
    """Two adapters merged; deleting one leaves W + ΔW_other (float32 round-off), the other still merged."""
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    original = base.weight.detach().clone()
    layer = KasaLayer(base)
    first, second = _random_adapter(seed=1), _random_adapter(seed=2)
    layer.add_adapter("first", first)
    layer.add_adapter("second", second)
    layer.active_adapters = ["first"]
    layer.merge(["first", "second"])
    layer.delete_adapter("first")
    assert layer.merged_adapters == ["second"] and layer.active_adapters == [] and "first" not in layer.kasa_adapters
    torch.testing.assert_close(base.weight, original + second.delta_weight(), rtol=1e-5, atol=1e-5)
    layer.delete_adapter("second")
    torch.testing.assert_close(base.weight, original, rtol=1e-5, atol=1e-5)
