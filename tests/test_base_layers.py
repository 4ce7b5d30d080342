"""The base-layer seam: every registered kind keeps the protocol's contract on an example layer of its own.

References: the layer's own forward (the weight matrix is the linear map the layer computes), the stored parameter
(views write through, merges add exactly the delta rounded once), and the registry's order. A kind registered
without an example layer here fails ``test_every_registered_kind_has_an_example``.
"""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kasa_peft import base_layers
from kasa_peft.base_layers import KINDS, kind_of
from kasa_peft.base_layers.unsupported import REFUSED, UNSUPPORTED_CLASS_NAMES
from kasa_peft.base_layers.zero3 import Zero3Gathered


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(12, 7)


def _conv1d() -> nn.Module:
    torch.manual_seed(0)
    return Conv1D(7, 12)  # nf = out = 7, nx = in = 12; weight stored 12 × 7


def _bnb_layer(directory, variant: str) -> nn.Module:
    pytest.importorskip("bitsandbytes", reason='bitsandbytes is not installed: pip install "kasa-peft[quant]"')
    from _quantized import load_quantized

    # train mode: bitsandbytes' dequantise-then-matmul path (its CPU inference kernel repacks 4-bit weights).
    return load_quantized(directory, variant).model.layers[0].mlp.down_proj.train()


EXAMPLES = {
    "linear": lambda directory: _linear(),
    "conv1d": lambda directory: _conv1d(),
    "bnb-4bit": lambda directory: _bnb_layer(directory, "nf4-dq"),
    "bnb-8bit": lambda directory: _bnb_layer(directory, "int8"),
}
# How closely layer(x) − bias must match x · Wᵀ: dense layers compute with W itself; LLM.int8 also rounds x to int8.
FORWARD_TOLERANCE = {"linear": 1e-6, "conv1d": 1e-6, "bnb-4bit": 1e-5, "bnb-8bit": 5e-2}
REGISTERED = [kind for kind in KINDS if kind is not REFUSED]


def test_every_registered_kind_has_an_example():
    assert {kind.name for kind in REGISTERED} == set(EXAMPLES)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from _quantized import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(params=[kind.name for kind in REGISTERED])
def example(request, tiny_llama_dir) -> tuple[base_layers.BaseLayerKind, nn.Module]:
    kind = next(k for k in REGISTERED if k.name == request.param)
    return kind, EXAMPLES[kind.name](tiny_llama_dir)


def test_the_registry_picks_the_examples_kind(example):
    kind, layer = example
    assert kind_of(layer) is kind
    assert base_layers.is_supported(layer) and base_layers.unsupported_quantised_reason(layer) is None


def test_weight_matrix_is_the_map_the_layer_computes(example):
    kind, layer = example
    out_features, in_features = base_layers.layer_shape(layer)
    weight = base_layers.weight_matrix(layer)
    assert tuple(weight.shape) == (out_features, in_features)
    x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = x.double() @ weight.double().T
        if layer.bias is not None:
            expected = expected + layer.bias.double()
        actual = layer(x).double()
    tolerance = FORWARD_TOLERANCE[kind.name]
    torch.testing.assert_close(actual, expected, atol=tolerance * expected.abs().max().item(), rtol=0)


def test_dense_weight_is_the_weight_matrix_cast(example):
    _, layer = example
    with base_layers.dense_weight(layer, torch.float64) as weight:
        assert weight.dtype == torch.float64
        assert torch.equal(weight, base_layers.weight_matrix(layer).detach().double())
    assert not weight.requires_grad


def test_device_adapter_dtype_and_fingerprint(example):
    _, layer = example
    assert base_layers.layer_device(layer) == torch.device("cpu")
    assert not base_layers.is_on_meta(layer)
    assert base_layers.default_adapter_dtype(layer) == torch.float32
    from kasa_peft.checkpoint import weight_fingerprint

    assert torch.equal(base_layers.layer_fingerprint(layer), weight_fingerprint(base_layers.weight_matrix(layer)))


def test_merge_adds_exactly_the_delta_or_is_refused(example):
    kind, layer = example
    assert base_layers.can_merge_into(layer) == (not kind.quantized)
    out_features, in_features = base_layers.layer_shape(layer)
    delta = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(2))
    if kind.quantized:
        with pytest.raises(NotImplementedError):
            base_layers.add_to_weight(layer, delta)
        return
    before = base_layers.weight_matrix(layer).detach().clone()
    stored = layer.weight
    base_layers.add_to_weight(layer, delta)
    assert layer.weight is stored  # written in place: tied weights stay tied
    torch.testing.assert_close(base_layers.weight_matrix(layer), before + delta, atol=0, rtol=0)


def test_merge_rounds_once_into_a_half_precision_weight():
    layer = _linear().to(torch.bfloat16)
    before = layer.weight.detach().clone()
    delta = 1e-3 * torch.randn(7, 12, generator=torch.Generator().manual_seed(3))
    merged = base_layers.weight_plus(layer, delta)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (before.float() + delta).to(torch.bfloat16))
    assert torch.equal(layer.weight, before)  # weight_plus writes nothing


def test_float64_dense_bases_keep_float64_adapters():
    assert base_layers.default_adapter_dtype(_linear().double()) == torch.float64
    assert base_layers.default_adapter_dtype(_conv1d().double()) == torch.float64


def test_conv1d_is_transposed_and_its_view_writes_through():
    layer = _conv1d()
    assert base_layers.fan_in_fan_out(layer) and not base_layers.fan_in_fan_out(_linear())
    with torch.no_grad():
        base_layers.weight_matrix(layer)[0, 1] = 5.0
    assert layer.weight[1, 0] == 5.0


def _refused_layer(class_name: str) -> nn.Module:
    cls = type(class_name, (nn.Linear,), {})  # some of them subclass nn.Linear: the table must still win
    cls.__module__ = "somequant.layers"
    return cls(4, 4)


@pytest.mark.parametrize("class_name", sorted(UNSUPPORTED_CLASS_NAMES))
def test_the_refusal_table_refuses_by_class_name(class_name):
    layer = _refused_layer(class_name)
    assert kind_of(layer) is None
    assert class_name in base_layers.unsupported_quantised_reason(layer)
    with pytest.raises(TypeError, match=rf"'proj'.*{class_name}.*{UNSUPPORTED_CLASS_NAMES[class_name].split()[0]}"):
        base_layers.require_supported(layer, "proj")


def test_an_unknown_module_is_not_a_base_layer():
    assert kind_of(nn.Embedding(4, 4)) is None and base_layers.unsupported_quantised_reason(nn.Embedding(4, 4)) is None
    with pytest.raises(TypeError, match="'emb' is a Embedding; KaSA wraps .*torch.nn.Linear"):
        base_layers.require_supported(nn.Embedding(4, 4), "emb")


@pytest.fixture
def fake_zero3(monkeypatch):
    """A ZeRO-3 stand-in: partitioned parameters carry ``ds_id`` and hold an empty placeholder outside the gather."""
    gathered: list[list[nn.Parameter]] = []

    @contextlib.contextmanager
    def gathered_parameters(params, modifier_rank=None):
        saved = [p.data for p in params]
        for p in params:
            p.data = p.ds_full
        gathered.append(list(params))
        try:
            yield
        finally:
            for p, data in zip(params, saved):
                p.data = data

    deepspeed = types.ModuleType("deepspeed")
    deepspeed.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)

    def partition(layer: nn.Module) -> nn.Module:
        for p in layer.parameters(recurse=False):
            p.ds_id, p.ds_full = 0, p.data.clone()
            p.data = torch.empty(0)
        return layer

    return partition, gathered


@pytest.mark.parametrize("build", [_linear, _conv1d], ids=["linear", "conv1d"])
def test_zero3_wraps_the_layers_kind_and_reads_the_gathered_weight(fake_zero3, build):
    partition, gathered = fake_zero3
    reference = build()
    full = base_layers.weight_matrix(reference).detach().clone()
    layer = partition(build())
    kind = kind_of(layer)
    assert isinstance(kind, Zero3Gathered) and kind.inner is kind_of(reference)
    assert kind.reads_a_copy and not base_layers.is_on_meta(layer)
    assert base_layers.layer_shape(layer) == (7, 12)
    with base_layers.dense_weight(layer, torch.float64) as weight:
        assert torch.equal(weight, full.double())
    assert gathered and base_layers.weight_matrix(layer).numel() == 0  # released again after the read
    [minor] = base_layers.truncate_layers({"layer": layer}, 2, "svd")
    [expected] = base_layers.truncate_layers({"layer": reference}, 2, "svd")
    torch.testing.assert_close(minor.product(), expected.product())
