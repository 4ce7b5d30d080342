"""Activation basis (research variant, not the paper's method) against an explicit float64 SVD of W·C_δ^{1/2}."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kasa_peft import KasaConfig, KasaModel, get_kasa_model
from kasa_peft.activation_basis import activation_minor_components, canonical_minor_components, damped_second_moment
from kasa_peft.spectral import minor_components_svd


def _sqrtm(c: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(c)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def _reference(weight: torch.Tensor, moment: torch.Tensor, r: int, damping: float) -> torch.Tensor:
    """W_minor = U'_r U'_rᵀ W from the full float64 SVD of A = W C_δ^{1/2} (its r smallest of k = min(out, in))."""
    n = moment.shape[0]
    damped = moment + damping * torch.trace(moment) / n * torch.eye(n, dtype=torch.float64)
    u, _, _ = torch.linalg.svd(weight @ _sqrtm(damped), full_matrices=False)
    minor_u = u[:, -r:]
    return minor_u @ minor_u.T @ weight


def _case(out_features: int, in_features: int, tokens: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    # Anisotropic inputs, fewer tokens than features in some cases: C is then singular and damping decides the rest.
    scales = torch.logspace(1, -1, in_features, dtype=torch.float64)
    x = torch.randn(tokens, in_features, generator=generator, dtype=torch.float64) * scales
    return weight, x.T @ x / tokens


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8), (12, 5)])
@pytest.mark.parametrize("tokens", [3, 40])
@pytest.mark.parametrize("damping", [1e-3, 0.1])
def test_fast_path_matches_float64_svd_reference(shape, tokens, damping):
    weight, moment = _case(*shape, tokens, seed=sum(shape) + tokens)
    r = 2
    minor = activation_minor_components(weight, moment, r, damping)
    expected = _reference(weight, moment, r, damping)
    torch.testing.assert_close(minor.product(), expected, atol=1e-9, rtol=1e-7)
    # Canonical form: minor_vh orthonormal rows, σ = the singular values of W_minor itself.
    torch.testing.assert_close(minor.minor_vh @ minor.minor_vh.T, torch.eye(r, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(minor.singular_values, torch.linalg.svdvals(expected)[:r], atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_dropped_activation_energy_is_the_r_smallest_and_beats_the_weight_basis(shape):
    weight, moment = _case(*shape, tokens=50, seed=7)
    r, damping = 2, 0.01
    damped = damped_second_moment(moment, damping)
    root = _sqrtm(damped)
    activation = activation_minor_components(weight, moment, r, damping).product()
    weight_basis = minor_components_svd(weight, r).product()
    energy = lambda m: float(torch.linalg.matrix_norm(m @ root) ** 2)  # noqa: E731
    smallest = torch.linalg.svdvals(weight @ root)[-r:]
    assert energy(activation) == pytest.approx(float(smallest.square().sum()), rel=1e-8)
    assert energy(activation) < energy(weight_basis)


def test_isotropic_inputs_give_the_papers_weight_basis():
    generator = torch.Generator().manual_seed(3)
    for shape in [(7, 11), (11, 7)]:
        weight = torch.randn(*shape, generator=generator, dtype=torch.float64)
        identity = torch.eye(shape[1], dtype=torch.float64)
        torch.testing.assert_close(activation_minor_components(weight, identity, 3).product(),
                                   minor_components_svd(weight, 3).product(), atol=1e-10, rtol=1e-8)


def test_canonical_factors_keep_the_product():
    generator = torch.Generator().manual_seed(5)
    left, right = torch.randn(9, 3, generator=generator), torch.randn(3, 13, generator=generator)
    minor = canonical_minor_components(left, right)
    torch.testing.assert_close(minor.product(), left.double() @ right.double(), atol=1e-10, rtol=1e-8)
    assert bool((minor.singular_values[:-1] >= minor.singular_values[1:]).all())


def test_bad_inputs_are_refused():
    weight, moment = _case(6, 10, 20, 0)
    with pytest.raises(ValueError, match="damping must be > 0"):
        activation_minor_components(weight, moment, 2, damping=0.0)
    with pytest.raises(ValueError, match=r"expected \(10, 10\)"):
        activation_minor_components(weight, moment[:5, :5], 2)
    with pytest.raises(ValueError, match="second moment is zero"):
        activation_minor_components(weight, torch.zeros(10, 10, dtype=torch.float64), 2)


def test_kasa_model_with_activation_basis_spares_the_planted_direction(tmp_path):
    # Damping is relative to the mean eigenvalue of C, which the 200× outlier inflates: keep δ small here.
    # (With δ = 0.01 the damping swamps the isotropic directions and the planted one is dropped again.)
    from test_truncation_report import PlantedModel, _batches

    base = PlantedModel()
    batches = _batches()
    config = lambda basis: KasaConfig(r=1, target_modules=["control", "planted"], truncation_guard="off",  # noqa: E731
                                      truncation_basis=basis, activation_damping=1e-4)
    weight_model = get_kasa_model(copy.deepcopy(base), config("weight"))
    activation_model = get_kasa_model(copy.deepcopy(base), config("activation"), calibration_batches=batches)
    weight_report = weight_model.truncation_report(batches)
    activation_report = activation_model.truncation_report(batches)
    change = lambda report: {m.name: m.output_change for m in report.modules}  # noqa: E731
    assert activation_report.basis == "activation"
    assert change(activation_report)["planted"] < 0.2 * change(weight_report)["planted"]
    assert activation_report.loss_change < weight_report.loss_change

    activation_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "kasa_config.json").read_text())["truncation_basis"] == "activation"
    loaded = KasaModel.from_pretrained(copy.deepcopy(base), tmp_path)  # no calibration data needed to load
    x = batches[0]["x"]
    assert torch.equal(loaded(x=x)["logits"], activation_model(x=x)["logits"])
