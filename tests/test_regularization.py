"""The regulariser: paper form by definition, authors' form against explicit outer Grams, PEFT's own loss."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from _factories import CASES

from kasa_peft import KasaConfig, get_kasa_model
from kasa_peft.regularization import kasa_regularization


def _random_factors(seed: int, shapes):
    generator = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, n, generator=generator, dtype=torch.float64) for r, n, _ in shapes]
    b = [torch.randn(m, r, generator=generator, dtype=torch.float64) for r, _, m in shapes]
    s = [torch.randn(r, generator=generator, dtype=torch.float64) for r, _, _ in shapes]
    return a, b, s


SHAPES = [(3, 10, 7), (3, 10, 7), (2, 5, 9)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), beta=st.floats(0, 1), gamma=st.floats(0, 1))
def test_paper_form_by_definition(seed, beta, gamma):
    a, b, s = _random_factors(seed, SHAPES)
    expected = sum(
        beta * float((si**2).sum())
        + gamma * float(torch.linalg.matrix_norm(ai @ ai.T - torch.eye(ai.shape[0], dtype=ai.dtype)))
        + gamma * float(torch.linalg.matrix_norm(bi.T @ bi - torch.eye(bi.shape[1], dtype=bi.dtype)))
        for ai, bi, si in zip(a, b, s)
    )
    got = float(kasa_regularization(a, b, s, beta, gamma, form="paper"))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_authors_form_equals_explicit_outer_grams(seed):
    a, b, s = _random_factors(seed, SHAPES)
    beta, gamma = 0.1, 0.01
    outer = sum(
        float(torch.linalg.matrix_norm(ai.T @ ai - torch.eye(ai.shape[1], dtype=ai.dtype)))
        + float(torch.linalg.matrix_norm(bi @ bi.T - torch.eye(bi.shape[0], dtype=bi.dtype)))
        for ai, bi in zip(a, b)
    )
    expected = (beta * sum(float((si**2).sum()) for si in s) + gamma * outer) / len(a)
    got = float(kasa_regularization(a, b, s, beta, gamma, form="authors"))
    assert got == pytest.approx(expected, rel=1e-5)


def test_zero_gradient_at_orthonormal_factors_is_finite():
    a = torch.eye(3, 6, requires_grad=True)
    b = torch.eye(5, 3, requires_grad=True)
    s = torch.zeros(3, requires_grad=True)
    loss = kasa_regularization([a], [b], [s], 1.0, 1.0)
    loss.backward()
    assert float(loss) == 0.0
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_matches_peft_kasa_loss():
    """Same A, B, σ → PEFT's LoraModel._get_kasa_loss() equals our regularization_loss() (paper form)."""
    import peft
    from peft.tuners.lora import KasaConfig as PeftKasaConfig

    case = CASES[0]
    original = case.build()
    ours = get_kasa_model(copy.deepcopy(original), KasaConfig(r=4, target_modules=["q_proj", "down_proj"], beta=0.3, gamma=0.05))
    theirs = peft.get_peft_model(
        copy.deepcopy(original),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], kasa_config=PeftKasaConfig(beta=0.3, gamma=0.05)),
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, layer in ours.kasa_layers():
            adapter = layer.kasa_adapters["default"]
            adapter.lora_B.normal_(generator=generator)
            peft_layer = theirs.base_model.model.get_submodule(path)
            peft_layer.lora_A["default"].weight.copy_(adapter.lora_A)
            peft_layer.lora_B["default"].weight.copy_(adapter.lora_B)
            peft_layer.lora_diag["default"].copy_(adapter.sigma)
    assert float(ours.regularization_loss()) == pytest.approx(float(theirs.base_model._get_kasa_loss()), rel=1e-5)


def test_orthogonality_penalty_defaults_to_the_paper_form_and_refuses_unknown_forms():
    from kasa_peft.regularization import orthogonality_penalty

    a, b, _ = _random_factors(0, SHAPES)
    expected = sum(
        float(torch.linalg.matrix_norm(ai @ ai.T - torch.eye(ai.shape[0], dtype=ai.dtype)))
        + float(torch.linalg.matrix_norm(bi.T @ bi - torch.eye(bi.shape[1], dtype=bi.dtype)))
        for ai, bi in zip(a, b)
    )
    assert float(orthogonality_penalty(a, b)) == pytest.approx(expected, rel=1e-5)
    for function, args in ((orthogonality_penalty, (a, b)), (kasa_regularization, (a, b, [], 0.1, 0.1))):
        with pytest.raises(ValueError, match="Unknown regularization form 'Paper'"):
            function(*args, form="Paper")


def test_near_orthonormal_factors_by_definition():
    """Deviations below 1 (the regime training drives towards): the norm is √(‖G − I‖²), not cut to zero."""
    generator = torch.Generator().manual_seed(0)
    a = torch.eye(3, 8, dtype=torch.float64) + 0.01 * torch.randn(3, 8, generator=generator, dtype=torch.float64)
    b = torch.eye(6, 3, dtype=torch.float64) + 0.01 * torch.randn(6, 3, generator=generator, dtype=torch.float64)
    expected = float(torch.linalg.matrix_norm(a @ a.T - torch.eye(3, dtype=a.dtype))) + float(
        torch.linalg.matrix_norm(b.T @ b - torch.eye(3, dtype=b.dtype))
    )
    assert 0 < expected < 0.5
    got = kasa_regularization([a], [b], [torch.zeros(3, dtype=torch.float64)], beta=0.0, gamma=1.0)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_penalties_are_float32_scalars_whatever_the_factor_dtype():
    from kasa_peft.regularization import orthogonality_penalty, singular_value_penalty

    a, b, s = _random_factors(1, SHAPES)  # float64
    for value in (orthogonality_penalty(a, b), singular_value_penalty(s), kasa_regularization(a, b, s, 0.1, 0.1)):
        assert value.dtype == torch.float32 and value.shape == ()
    for empty in (orthogonality_penalty([], []), singular_value_penalty([]), kasa_regularization([], [], [], 0.1, 0.1)):
        assert empty.shape == () and float(empty) == 0.0
