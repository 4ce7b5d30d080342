"""Adapter management and PEFT exchange: each test reproduces one defect of issue 8 and states its reference."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from peft.tuners.lora import KasaConfig as PeftKasaConfig
from safetensors.torch import load_file, save_file
from torch import nn
from _factories import CASES

from kasa_peft import KasaConfig, KasaModel, export_peft_checkpoint, get_kasa_model
from kasa_peft.checkpoint import WEIGHTS_NAME, AdapterFileError
from kasa_peft.config import CONFIG_NAME
from kasa_peft.regularization import kasa_regularization

LLAMA, BERT = CASES[0], CASES[2]


def _trainable_tensors(model) -> int:
    return sum(1 for p in model.parameters() if p.requires_grad)


def _perturb(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.kasa_layers():
            for adapter in layer.kasa_adapters.values():
                adapter.lora_B.copy_(0.1 * torch.randn(adapter.lora_B.shape, generator=generator))


# ---------------------------------------------------------------- 1. is_trainable=False is per adapter
def test_loading_an_adapter_for_inference_freezes_only_that_adapter(tmp_path):
    original = LLAMA.build()
    model = get_kasa_model(copy.deepcopy(original), KasaConfig(r=2, target_modules=["q_proj"]))
    assert _trainable_tensors(model) == 6  # A, B, σ on two layers
    get_kasa_model(copy.deepcopy(original), KasaConfig(r=2, target_modules=["v_proj"])).save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="frozen", is_trainable=False)
    assert _trainable_tensors(model) == 6, "the adapter being trained must stay trainable"
    model.set_adapter("frozen")
    assert _trainable_tensors(model) == 0
    model.add_adapter("later", KasaConfig(r=2, target_modules=["k_proj"]))
    model.set_adapter("later")
    assert _trainable_tensors(model) == 6, "an adapter added later must be trainable"
    model.set_adapter("default")
    assert _trainable_tensors(model) == 6


# ---------------------------------------------------------------- 2. truncate=False cannot go out as PEFT KaSA
def test_export_of_an_untruncated_adapter(tmp_path):
    original = LLAMA.build()
    inputs = LLAMA.make_inputs()
    ours = get_kasa_model(copy.deepcopy(original), KasaConfig(r=4, target_modules=["q_proj", "v_proj"], truncate=False))
    _perturb(ours)
    with pytest.raises(ValueError, match="truncate=False.*format='lora'"):
        export_peft_checkpoint(ours, tmp_path / "kasa", format="kasa")
    assert not (tmp_path / "kasa").exists()
    export_peft_checkpoint(ours, tmp_path / "lora", format="lora")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "lora").eval()
    torch.testing.assert_close(theirs(**inputs).logits, ours(**inputs).logits, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 3. nothing of a PEFT file is dropped silently
def test_peft_lora_bias_is_refused_not_dropped(tmp_path):
    original = LLAMA.build()
    theirs = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lora_bias=True"):
        KasaModel.from_pretrained(copy.deepcopy(original), tmp_path)


def _peft_lora_dir(tmp_path, original):
    peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    return tmp_path / "adapter_model.safetensors"


@pytest.mark.parametrize(
    "extra_key",
    [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",  # what lora_bias=True writes
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",  # DoRA
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",  # a module the config does not target
    ],
)
def test_unknown_tensors_in_a_peft_file_are_an_error(tmp_path, extra_key):
    original = LLAMA.build()
    weights = _peft_lora_dir(tmp_path, original)
    tensors = load_file(weights)
    tensors[extra_key] = torch.zeros(4, 2)
    save_file(tensors, weights, metadata={"format": "pt"})
    model = KasaModel(copy.deepcopy(original), None)
    with pytest.raises(ValueError, match=extra_key.split(".", 2)[2].replace(".", r"\.")):
        model.load_adapter(tmp_path)
    assert not model.peft_config and not list(model.kasa_layers()), "the model must be left untouched"


def test_peft_file_lacking_a_tensor_is_an_error(tmp_path):
    original = LLAMA.build()
    weights = _peft_lora_dir(tmp_path, original)
    tensors = load_file(weights)
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing.*layers\.1\.self_attn\.q_proj\.lora_B"):
        KasaModel.from_pretrained(copy.deepcopy(original), tmp_path)


# ---------------------------------------------------------------- 4. a target inside modules_to_save
def test_all_linear_leaves_modules_to_save_to_full_training(tmp_path):
    original = BERT.build()
    inputs = BERT.make_inputs()
    config = KasaConfig(r=2, target_modules="all-linear", modules_to_save=["classifier", "pooler"], beta=0.1, gamma=0.01)
    model = get_kasa_model(copy.deepcopy(original), config)
    paths = [path for path, _ in model.kasa_layers()]
    assert paths and not any("pooler" in path for path in paths)
    # Reference for the regulariser: one term per adapted layer, each layer counted once.
    adapters = [layer.kasa_adapters["default"] for _, layer in model.kasa_layers()]
    per_layer = sum(
        kasa_regularization([a.lora_A], [a.lora_B], [a.sigma], 0.1, 0.01)
        for a in adapters
    )
    torch.testing.assert_close(model.regularization_loss(), per_layer)
    _perturb(model)
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = KasaModel.from_pretrained(copy.deepcopy(original), tmp_path)
    assert torch.equal(loaded(**inputs).logits, expected)


def test_explicit_target_inside_modules_to_save_is_refused():
    model = BERT.build()
    with pytest.raises(ValueError, match=r"bert\.pooler\.dense.*inside the modules_to_save module 'bert\.pooler'"):
        get_kasa_model(model, KasaConfig(r=2, target_modules=["dense"], modules_to_save=["pooler"]))
    assert not any(type(m).__name__ in ("KasaLayer", "ModulesToSaveWrapper") for m in model.modules())
    # exclude_modules resolves it, as the message says.
    get_kasa_model(BERT.build(), KasaConfig(r=2, target_modules=["dense"], exclude_modules=["pooler.dense"], modules_to_save=["pooler"]))


def test_modules_to_save_around_another_adapters_layer_is_refused():
    model = get_kasa_model(BERT.build(), KasaConfig(r=2, target_modules=["pooler.dense"]))
    with pytest.raises(ValueError, match=r"'bert\.pooler' contains layers that already carry adapters"):
        model.add_adapter("head", KasaConfig(r=2, target_modules=["query"], modules_to_save=["pooler"]))
    assert list(model.peft_config) == ["default"]


# ---------------------------------------------------------------- 5. exported targets are exact paths
class _Nested(nn.Module):
    """``inner.proj``'s path ends with the adapted ``proj``: PEFT's suffix rule would adapt it too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(16, 16)
        self.inner = nn.Module()
        self.inner.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.inner.proj(torch.tanh(self.proj(x)))


@pytest.mark.parametrize("fmt", ["kasa", "lora"])
def test_export_adapts_exactly_our_modules_in_peft(tmp_path, fmt):
    original = _Nested().eval()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    ours = get_kasa_model(copy.deepcopy(original), KasaConfig(r=3, target_modules="proj"))
    assert [path for path, _ in ours.kasa_layers()] == ["proj"]
    _perturb(ours)
    export_peft_checkpoint(ours, tmp_path, format=fmt)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path).eval()
    adapted = {name for name, module in theirs.base_model.model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"proj"}
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 8. set-valued config fields save
def test_set_valued_module_lists_save_and_load(tmp_path):
    original = LLAMA.build()
    inputs = LLAMA.make_inputs()
    config = KasaConfig(
        r=2, target_modules={"v_proj", "q_proj"}, exclude_modules={"layers.1.self_attn.v_proj", "layers.0.self_attn.q_proj"}
    )
    assert config.exclude_modules == ["layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    model = get_kasa_model(copy.deepcopy(original), config)
    assert [p for p, _ in model.kasa_layers()] == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"]
    _perturb(model)
    model.save_pretrained(tmp_path)
    loaded = KasaModel.from_pretrained(copy.deepcopy(original), tmp_path)
    assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    assert loaded.peft_config["default"].exclude_modules == config.exclude_modules


# ---------------------------------------------------------------- loading: one error naming the file
def _saved(tmp_path):
    original = LLAMA.build()
    model = get_kasa_model(copy.deepcopy(original), KasaConfig(r=2, target_modules=["q_proj"]))
    _perturb(model)
    model.save_pretrained(tmp_path)
    return original


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_tensor_is_refused_naming_tensor_and_file(tmp_path, bad):
    original = _saved(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    tensors = load_file(weights)
    key = "model.layers.1.self_attn.q_proj.sigma"
    tensors[key][1] = bad
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match=rf"{weights}.*{key}.*NaN/Inf"):
        KasaModel.from_pretrained(copy.deepcopy(original), tmp_path)


def test_truncated_weights_give_one_error_naming_the_file(tmp_path):
    original = _saved(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterFileError, match=rf"{weights} is not a readable safetensors file"):
        KasaModel.from_pretrained(copy.deepcopy(original), tmp_path)
    weights.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ValueError, match=str(weights)):
        KasaModel.from_pretrained(copy.deepcopy(original), tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [('{"r": 2, "target_modules": ["q_proj"', "not valid JSON"), ("[1, 2]", "JSON object"), ('{"r": -1, "target_modules": ["q_proj"]}', "positive integer")],
)
def test_invalid_adapter_json_names_the_file(tmp_path, text, message):
    original = _saved(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(text)
    with pytest.raises(AdapterFileError, match=rf"{tmp_path / CONFIG_NAME}.*{message}"):
        KasaModel.from_pretrained(copy.deepcopy(original), tmp_path)


def test_invalid_peft_json_names_the_file(tmp_path):
    original = LLAMA.build()
    _peft_lora_dir(tmp_path, original)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    with pytest.raises(AdapterFileError, match=rf"{tmp_path / 'adapter_config.json'} is not valid JSON"):
        KasaModel.from_pretrained(copy.deepcopy(original), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(AdapterFileError, match="adapter_config.json.*target_modules is required"):
        KasaModel.from_pretrained(copy.deepcopy(original), tmp_path)


def test_peft_kasa_checkpoint_still_imports(tmp_path):
    """The stricter import keeps accepting what PEFT's KaSA writes (A, B, lora_diag on the targets)."""
    original = LLAMA.build()
    inputs = LLAMA.make_inputs()
    theirs = peft.get_peft_model(
        copy.deepcopy(original), peft.LoraConfig(r=2, target_modules=["q_proj"], kasa_config=PeftKasaConfig())
    ).eval()
    theirs.save_pretrained(tmp_path)
    ours = KasaModel.from_pretrained(copy.deepcopy(original), tmp_path)
    torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, rtol=1e-4, atol=1e-5)
