"""Truncation report and guard on a tiny model with a planted trap, checked against a float64 SVD + matmul.

The planted model has two 8×8 linear layers with the same spectrum (σ = 3 … 1.2, minor σ = 0.05, so dropping
r = 1 removes the same tiny weight energy from both). ``control`` sees isotropic inputs; ``planted`` sees inputs
amplified 200× along its own minor right singular vector, so dropping that direction changes its output a lot:
weight-space energy does not predict the damage, the activations do.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

from kasa_peft import KasaConfig, KasaModel, get_kasa_model
from kasa_peft.truncation_guard import TruncationGuardWarning
from kasa_peft.truncation_report import TruncationReport

D = 8
MINOR_SIGMA = 0.05
AMPLIFY = 200.0


def _orthogonal(generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=generator, dtype=torch.float64))
    return q


class PlantedModel(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        spectrum = torch.linspace(3.0, 1.2, D, dtype=torch.float64)
        spectrum[-1] = MINOR_SIGMA
        self.control = nn.Linear(D, D)
        self.planted = nn.Linear(D, D)
        with torch.no_grad():
            for layer in (self.control, self.planted):
                u, v = _orthogonal(generator), _orthogonal(generator)
                layer.weight.copy_((u * spectrum) @ v.T)
                layer.bias.copy_(torch.randn(D, generator=generator))
                minor_v = v[:, -1]
        # planted's minor right singular vector (the last one drawn); control's inputs stay isotropic.
        self.register_buffer("amplify", (torch.eye(D, dtype=torch.float64) + AMPLIFY * torch.outer(minor_v, minor_v)).float())

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        y = self.control(x) + self.planted(x @ self.amplify)
        loss = ((y - labels) ** 2).mean() if labels is not None else None
        return {"loss": loss, "logits": y}


def _batches(n_batches: int = 2, rows: int = 16, seed: int = 1) -> list[dict]:
    """Inputs, and labels the untruncated model nearly fits (as a pretrained model does): truncation raises the loss."""
    generator = torch.Generator().manual_seed(seed)
    teacher = PlantedModel()
    batches = []
    for _ in range(n_batches):
        x = torch.randn(rows, D, generator=generator)
        with torch.no_grad():
            labels = teacher(x)["logits"] + 0.1 * torch.randn(rows, D, generator=generator)
        batches.append({"x": x, "labels": labels})
    return batches


def _config(**overrides) -> KasaConfig:
    return KasaConfig(r=1, target_modules=["control", "planted"], **overrides)


def _reference_minor(weight: torch.Tensor, r: int = 1) -> torch.Tensor:
    """W_minor from an explicit float64 full SVD."""
    u, s, vh = torch.linalg.svd(weight.detach().double())
    return (u[:, -r:] * s[-r:]) @ vh[-r:, :]


def _direct_loss(model: PlantedModel, batches: list[dict], truncate: set[str]) -> float:
    """Mean batch loss of a copy whose truncated layers hold W − W_minor in their weight (no hooks)."""
    copy_model = copy.deepcopy(model)
    with torch.no_grad():
        for name in truncate:
            layer = getattr(copy_model, name)
            layer.weight.copy_(layer.weight.double() - _reference_minor(layer.weight))
    with torch.no_grad():
        return sum(float(copy_model(**b)["loss"]) for b in batches) / len(batches)


def test_report_matches_direct_float64_computation():
    base = PlantedModel()
    batches = _batches()
    model = get_kasa_model(copy.deepcopy(base), _config(truncation_guard="off"))
    report = model.truncation_report(batches, per_module_loss=True)
    inputs = {"control": torch.cat([b["x"] for b in batches]).double()}
    inputs["planted"] = inputs["control"] @ base.amplify.double()
    by_name = {m.name: m for m in report.modules}
    for name in ("control", "planted"):
        weight = getattr(base, name).weight.detach().double()
        minor = _reference_minor(weight)
        x = inputs[name]
        expected_change = float(torch.linalg.matrix_norm(x @ minor.T) / torch.linalg.matrix_norm(x @ weight.T))
        singular_values = torch.linalg.svdvals(weight)
        module = by_name[name]
        assert module.truncated and module.r == 1 and module.shape == (D, D)
        assert module.output_change == pytest.approx(expected_change, rel=1e-4)
        assert module.dropped_energy == pytest.approx(float(singular_values[-1] ** 2 / singular_values.square().sum()), rel=1e-5)
        assert module.sigma_ratio == pytest.approx(float(singular_values[-1] / singular_values[0]), rel=1e-5)
        assert module.loss_change_alone == pytest.approx(_direct_loss(base, batches, {name}) - _direct_loss(base, batches, set()), rel=1e-4, abs=1e-6)
    assert report.tokens == 32 and report.batches == 2
    assert report.loss_original == pytest.approx(_direct_loss(base, batches, set()), rel=1e-6)
    assert report.loss_truncated == pytest.approx(_direct_loss(base, batches, {"control", "planted"}), rel=1e-4)
    # The same weight energy is dropped from both, yet only the planted module's output moves.
    assert by_name["control"].dropped_energy == pytest.approx(by_name["planted"].dropped_energy, rel=1e-6)
    assert by_name["planted"].output_change > 0.5 > 0.05 > by_name["control"].output_change
    assert report.flagged_modules() == ["planted"]


def test_report_leaves_model_untouched_and_is_json():
    base = PlantedModel()
    batches = _batches(1)
    model = get_kasa_model(copy.deepcopy(base), _config(truncation_guard="off"))
    model.train()
    before = model(**batches[0])["logits"].detach().clone()
    report = model.truncation_report(batches)
    assert model.training, "the report must restore train mode"
    assert torch.equal(model(**batches[0])["logits"], before)
    text = json.dumps(report.to_dict())
    again = TruncationReport.from_dict(json.loads(text))
    assert again.to_dict() == report.to_dict()
    assert again.loss_change == pytest.approx(report.loss_truncated - report.loss_original)


def test_fresh_kasa_model_computes_exactly_the_truncated_model():
    """With B = 0 the adapter's output is base − truncation: the report's 'truncated' loss is the model's loss."""
    base = PlantedModel()
    batches = _batches(1)
    model = get_kasa_model(copy.deepcopy(base), _config(truncation_guard="off"))
    report = model.truncation_report(batches)
    model.eval()
    with torch.no_grad():
        assert float(model(**batches[0])["loss"]) == pytest.approx(report.loss_truncated, rel=1e-5)


def test_guard_off_truncates_the_planted_module_silently():
    base = PlantedModel()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationGuardWarning)
        model = get_kasa_model(copy.deepcopy(base), _config(truncation_guard="off"), calibration_batches=_batches())
    planted = model.base_model.planted.kasa_adapters["default"]
    assert planted.truncate
    torch.testing.assert_close(planted.minor_u_sigma @ planted.minor_vh, _reference_minor(base.planted.weight).float(),
                               atol=1e-5, rtol=1e-4)
    assert model.peft_config["default"].truncation_skipped_modules is None


def test_guard_warn_names_module_and_numbers_but_truncates():
    with pytest.warns(TruncationGuardWarning, match=r"calibration loss \d+\.\d+ → \d+\.\d+ .*planted \(output change 0\.\d+") as record:
        model = get_kasa_model(PlantedModel(), _config(truncation_guard="warn"), calibration_batches=_batches())
    assert "control" not in str(record[0].message)
    assert model.base_model.planted.kasa_adapters["default"].truncate
    assert model.peft_config["default"].truncation_skipped_modules is None


def test_guard_skip_spares_the_planted_module_and_survives_save_load(tmp_path):
    base = PlantedModel()
    batches = _batches()
    user_config = _config(truncation_guard="skip")
    with pytest.warns(TruncationGuardWarning, match="keeping 1 of 2 modules untruncated"):
        model = get_kasa_model(copy.deepcopy(base), user_config, calibration_batches=batches)
    assert user_config.truncation_skipped_modules is None, "the caller's config object must not be modified"
    assert model.peft_config["default"].truncation_skipped_modules == ["planted"]
    planted = model.base_model.planted.kasa_adapters["default"]
    control = model.base_model.control.kasa_adapters["default"]
    assert not planted.truncate and planted.minor_vh is None
    assert control.truncate
    # The spared module's adapter still trains, σ included.
    assert planted.sigma is not None and planted.sigma.requires_grad and planted.lora_A.requires_grad
    # Fresh model = original with only control truncated.
    model.eval()
    x = batches[0]["x"]
    with torch.no_grad():
        expected = base.planted(x @ base.amplify) + x @ (base.control.weight.double() - _reference_minor(base.control.weight)).T.float() + base.control.bias
        torch.testing.assert_close(model(x=x)["logits"], expected, atol=1e-5, rtol=1e-5)
    report = model.truncation_report(batches)
    assert {m.name: m.truncated for m in report.modules} == {"control": True, "planted": False}
    assert report.flagged_modules() == []

    with torch.no_grad():
        planted.lora_B.normal_()  # a trained-looking adapter
        reference = model(x=x)["logits"]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "kasa_config.json").read_text())
    assert saved["truncation_skipped_modules"] == ["planted"] and saved["truncation_guard"] == "skip"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationGuardWarning)  # loading never re-runs the guard
        loaded = KasaModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert not loaded.base_model.planted.kasa_adapters["default"].truncate
    assert torch.equal(loaded(x=x)["logits"], reference)


def test_guard_loss_threshold_uses_per_module_loss():
    batches = _batches()
    config = _config(truncation_guard="skip", truncation_guard_max_output_change=0.99, truncation_guard_max_loss_increase=0.05)
    with pytest.warns(TruncationGuardWarning, match=r"loss \+\d"):
        model = get_kasa_model(PlantedModel(), config, calibration_batches=batches)
    assert model.peft_config["default"].truncation_skipped_modules == ["planted"]


def test_hand_kept_modules_are_not_truncated_and_must_be_targets():
    model = get_kasa_model(PlantedModel(), _config(truncation_guard="off", truncation_skipped_modules=["control"]))
    assert not model.base_model.control.kasa_adapters["default"].truncate
    assert model.base_model.planted.kasa_adapters["default"].truncate
    with pytest.raises(ValueError, match="not targets: \\['nope'\\]"):
        get_kasa_model(PlantedModel(), _config(truncation_skipped_modules=["nope"]))


@pytest.mark.parametrize(
    "batches, message",
    [
        ([], "calibration_batches is empty"),
        ([{"input_ids": torch.zeros(2, 3, dtype=torch.long)}], r"keys \['input_ids'\] that PlantedModel.forward does not accept"),
        (["some text"], "is a str, not a non-empty dict"),
        ([{"x": torch.zeros(4, D + 1)}], "calibration batch 0 does not fit the model"),
        ([{"x": [1.0, 2.0]}], "holds no tensors"),
    ],
)
def test_bad_calibration_data_is_one_line_error(batches, message):
    with pytest.raises(ValueError, match=message) as info:
        get_kasa_model(PlantedModel(), _config(truncation_guard="warn"), calibration_batches=batches)
    assert "\n" not in str(info.value)


def test_skip_and_activation_basis_need_calibration_data():
    with pytest.raises(ValueError, match="truncation_guard='skip' needs calibration data"):
        get_kasa_model(PlantedModel(), _config(truncation_guard="skip"))
    with pytest.raises(ValueError, match="truncation_basis='activation' needs calibration data"):
        get_kasa_model(PlantedModel(), _config(truncation_basis="activation"))


@pytest.mark.parametrize(
    "field, value",
    [
        ("truncation_guard_max_output_change", 0.0),
        ("truncation_guard_max_output_change", 1.0),
        ("truncation_guard_max_output_change", -0.2),
        ("truncation_guard_max_output_change", "0.1"),
        ("truncation_guard_max_loss_increase", 0.0),
        ("truncation_guard_max_loss_increase", math.inf),
        ("truncation_guard", "maybe"),
        ("truncation_basis", "input"),
        ("activation_damping", 0.0),
        ("truncation_skipped_modules", "planted"),
    ],
)
def test_guard_settings_out_of_range_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"KasaConfig.{field} "):
        _config(**{field: value})


def test_padding_is_left_out_of_the_statistics():
    """A padded batch gives the same figures as its sequences one by one (causal LM, right padding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)).eval()
    model = get_kasa_model(llama, KasaConfig(r=2, target_modules=["v_proj", "down_proj"], truncation_guard="off"))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    padded = model.truncation_report([{"input_ids": ids, "attention_mask": mask}])
    separate = model.truncation_report([{"input_ids": ids[:1]}, {"input_ids": ids[1:, :4]}])
    assert padded.tokens == separate.tokens == 11
    for a, b in zip(padded.modules, separate.modules):
        assert a.output_change == pytest.approx(b.output_change, rel=1e-4)
