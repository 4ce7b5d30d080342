"""The budget guard: the fewest modules kept whole, along the output-change order, that hold the calibration loss
within a relative tolerance of the original's.

The search is checked as pure math (any loss sequence, monotone or not) and end to end on a tiny random Llama,
whose losses are recomputed without the package's hooks: weights replaced by ``W − W_minor`` from a float64 SVD.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kasa_peft import KasaConfig, KasaModel, get_kasa_model
from kasa_peft.truncation_budget import bisect_kept_count, loss_target
from kasa_peft.truncation_guard import TruncationGuardWarning

# ----------------------------------------------------------------------------------------------- the search
losses = st.floats(min_value=0.0, max_value=10.0) | st.just(math.nan)


@settings(max_examples=300, deadline=None)
@given(curve=st.lists(losses, min_size=2, max_size=70), target=st.floats(min_value=0.0, max_value=10.0))
def test_bisection_returns_a_boundary_within_log2_n_evaluations(curve, target):
    """For any L(0..n) with L(n) meeting the target: L(k) meets it, L(k − 1) does not (NaN never does), and the
    search asked for at most ⌈log₂ n⌉ values, all strictly inside 0 … n."""
    n = len(curve) - 1
    curve[n] = min(target, 0.0 if math.isnan(curve[n]) else curve[n])
    asked = []

    def loss_with_first_kept(k: int) -> float:
        asked.append(k)
        return curve[k]

    search = bisect_kept_count(n, loss_with_first_kept, target, curve[0], curve[n])
    k = search.kept
    assert curve[k] <= target and search.losses[k] == curve[k]
    assert k == 0 or not curve[k - 1] <= target
    assert all(0 < a < n for a in asked) and len(set(asked)) == len(asked) == search.evaluations
    assert search.evaluations <= math.ceil(math.log2(n)) if n > 1 else search.evaluations == 0


@settings(max_examples=200, deadline=None)
@given(drops=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=60),
       target=st.floats(min_value=0.0, max_value=70.0))
def test_bisection_on_a_non_increasing_curve_finds_the_fewest(drops, target):
    """When sparing more modules never raises the loss, the boundary is the first k that meets the target."""
    curve = [sum(drops[k:]) for k in range(len(drops) + 1)]  # L(n) = 0
    search = bisect_kept_count(len(drops), curve.__getitem__, target, curve[0], curve[-1])
    assert search.kept == next(k for k, loss in enumerate(curve) if loss <= target)


def test_target_is_relative_to_the_original_loss_magnitude():
    assert loss_target(2.0, 0.05) == pytest.approx(2.1)
    assert loss_target(-2.0, 0.05) == pytest.approx(-1.9)  # a negative loss still gets a higher ceiling
    with pytest.raises(ValueError, match="above the target"):
        bisect_kept_count(3, lambda k: 0.0, 1.0, 5.0, 1.5)


# ----------------------------------------------------------------------------------------------- a tiny random Llama
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
R = 12


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _batches(seed: int = 3) -> list[dict]:
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids, "labels": ids}, {"input_ids": ids[:2, :7], "labels": ids[:2, :7]}]


def _config(**overrides) -> KasaConfig:
    return KasaConfig(r=R, target_modules=TARGETS, **overrides)


def _direct_loss(base, batches: list[dict], truncated: set[str]) -> float:
    """Mean batch loss of a copy of ``base`` whose ``truncated`` Linears hold W − W_minor (float64 SVD), no hooks."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name in truncated:
            weight = model.get_submodule(name).weight
            u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
            weight.copy_(weight.double() - (u[:, -R:] * s[-R:]) @ vh[-R:, :])
        return sum(float(model(**b).loss) for b in batches) / len(batches)


def _count_forwards(model) -> dict:
    calls = {"n": 0}
    model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return calls


def _budget_case():
    """The tiny Llama, its output-change order and L(k) along it (direct float64 computation), and a tolerance
    whose target lies between L(0) and L(n), so that the guard has something to choose."""
    base, batches = _llama(), _batches()
    report = get_kasa_model(copy.deepcopy(base), _config(truncation_guard="off")).truncation_report(batches)
    order = [m.name for m in sorted(report.modules, key=lambda m: -m.output_change)]
    curve = [_direct_loss(base, batches, set(order[k:])) for k in range(len(order) + 1)]
    assert curve[0] > curve[-1] * 1.002, "the fixture must make truncation hurt"
    tolerance = 0.4 * (curve[0] - curve[-1]) / curve[-1]
    return base, batches, order, curve, tolerance


def test_budget_keeps_a_minimal_prefix_of_the_harm_order_that_meets_the_tolerance():
    base, batches, order, curve, tolerance = _budget_case()
    n = len(order)
    target = curve[-1] * (1 + tolerance)
    model = copy.deepcopy(base)
    calls = _count_forwards(model)
    with pytest.warns(TruncationGuardWarning, match=r"truncation_guard='budget'.*calibration passes"):
        kasa = get_kasa_model(model, _config(truncation_guard="budget", truncation_guard_loss_tolerance=tolerance),
                              calibration_batches=batches)
    kept = kasa.peft_config["default"].truncation_skipped_modules
    k = len(kept)
    assert 0 < k < n
    assert set(kept) == set(order[:k]), "the most harmful modules (largest output change) are kept first"
    assert curve[k] <= target, "the chosen set meets the tolerance"
    assert curve[k - 1] > target, "keeping one module fewer along the order breaks it"
    # The fresh model computes exactly the chosen truncation (B = 0).
    with torch.no_grad():
        fresh = sum(float(kasa(**b).loss) for b in batches) / len(batches)
    assert fresh == pytest.approx(curve[k], rel=1e-5)
    # Passes: statistics + original loss, all truncated, and at most ⌈log₂ n⌉ bisection steps (one call per batch).
    assert calls["n"] <= len(batches) * (2 + math.ceil(math.log2(n)))


def test_budget_with_a_loose_tolerance_keeps_nothing_in_two_passes():
    base, batches, order, curve, _ = _budget_case()
    loose = 1.01 * (curve[0] - curve[-1]) / curve[-1]
    model = copy.deepcopy(base)
    calls = _count_forwards(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationGuardWarning)
        kasa = get_kasa_model(model, _config(truncation_guard="budget", truncation_guard_loss_tolerance=loose),
                              calibration_batches=batches)
    assert kasa.peft_config["default"].truncation_skipped_modules is None
    assert calls["n"] == 2 * len(batches)


def test_budget_decision_survives_save_and_load(tmp_path):
    base, batches, _, _, tolerance = _budget_case()
    config = _config(truncation_guard="budget", truncation_guard_loss_tolerance=tolerance)
    with pytest.warns(TruncationGuardWarning):
        kasa = get_kasa_model(copy.deepcopy(base), config, calibration_batches=batches)
    assert config.truncation_skipped_modules is None, "the caller's config object must not be modified"
    kept = kasa.peft_config["default"].truncation_skipped_modules
    with torch.no_grad():
        for _, layer in kasa.kasa_layers():
            layer.kasa_adapters["default"].lora_B.normal_()  # a trained-looking adapter
        reference = kasa(**batches[0]).logits
    kasa.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "kasa_config.json").read_text())
    assert saved["truncation_skipped_modules"] == kept and saved["truncation_guard"] == "budget"
    assert saved["truncation_guard_loss_tolerance"] == tolerance
    fresh_base = copy.deepcopy(base)
    calls = _count_forwards(fresh_base)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationGuardWarning)
        loaded = KasaModel.from_pretrained(fresh_base, tmp_path)  # no calibration data: the guard never re-runs
    assert calls["n"] == 0
    assert {name for name, layer in loaded.kasa_layers() if not layer.kasa_adapters["default"].truncate} == set(kept)
    with torch.no_grad():
        assert torch.equal(loaded(**batches[0]).logits, reference)


def test_budget_needs_labelled_calibration_data():
    with pytest.raises(ValueError, match="truncation_guard='budget' needs calibration data") as info:
        get_kasa_model(_llama(), _config(truncation_guard="budget"))
    assert "\n" not in str(info.value)
    unlabelled = [{"input_ids": b["input_ids"]} for b in _batches()]
    with pytest.raises(ValueError, match="truncation_guard='budget' needs a calibration loss.*labels") as info:
        get_kasa_model(_llama(), _config(truncation_guard="budget"), calibration_batches=unlabelled)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [0.0, -0.05, math.inf, math.nan, "0.05", True])
def test_bad_tolerance_names_the_field(value):
    with pytest.raises(ValueError, match="KasaConfig.truncation_guard_loss_tolerance must be a finite number > 0") as info:
        _config(truncation_guard="budget", truncation_guard_loss_tolerance=value)
    assert "\n" not in str(info.value)
