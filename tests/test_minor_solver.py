"""The certified iterative minor-subspace path ('krylov') against a float64 full SVD.

What must hold on every path: the dropped energy ‖W_minor‖²_F within 1e-6 (relative) of the optimum Σ of the r
smallest σ²; W_world within 1e-6 (relative) of the reference where σ_{r+1}/σ_r ≥ 1.01; orthonormal minor_vh;
a certificate that is true whenever it is issued, and a logged dense fallback wherever it is not.
"""

from __future__ import annotations

import logging

import pytest
import torch
from _spectra import (
    F64,
    SPECTRUM_KINDS,
    assert_matches_dense_reference,
    check_against_svd,
    log_records,
    spectrum,
    with_spectrum,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import kasa_peft.spectral as spectral
from kasa_peft.minor_solver import (
    EPS64,
    SolverSettings,
    certify,
    count_eigenvalues_below,
    energy_bounds,
    ritz_pairs,
    smallest_eigenpairs,
)
from kasa_peft.spectral import (
    TruncationReport,
    minor_components_gram_eigh,
    minor_components_krylov,
    minor_components_svd,
    truncate_many,
)


# ---------------------------------------------------------------------------------------------- the inertia count
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**16), data=st.data())
def test_inertia_count_equals_eigenvalue_count(n, seed, data):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(3, n, n, generator=generator, dtype=F64)
    symmetric = a + a.mT  # indefinite: Bunch–Kaufman uses 2×2 pivots here
    eigenvalues = torch.linalg.eigvalsh(symmetric)
    index = data.draw(st.integers(0, n))
    # μ strictly between two eigenvalues (or beyond the ends), away from both.
    padded = torch.cat([eigenvalues[:, :1] - 1, eigenvalues, eigenvalues[:, -1:] + 1], dim=-1)
    mu = 0.5 * (padded[:, index] + padded[:, index + 1])
    count, ok = count_eigenvalues_below(symmetric, mu)
    assert ok.all()
    assert count.tolist() == (eigenvalues < mu[:, None]).sum(-1).tolist()


def test_certificate_rejects_an_exact_invariant_subspace_that_misses_the_smallest_eigenvector():
    # Residual zero, Ritz values exact eigenvalues, energy bound ≈ 0 — only the count of eigenvalues below μ
    # reveals that λ_1 is missing; the same check passes on the right subspace.
    k, r, p = 80, 4, 12
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(1), dtype=F64))
    gram = ((q * torch.linspace(1, 10, k, dtype=F64)) @ q.T)[None]
    delta = 4 * k * EPS64 * torch.linalg.matrix_norm(gram)
    for block, should_pass in ((q[None, :, 1 : p + 1], False), (q[None, :, :p], True)):
        theta, _, residual = ritz_pairs(gram, block)
        bounds, mus = energy_bounds(theta, residual.square().sum(-2), r, torch.zeros(1, dtype=F64), delta)
        best_bound, best = bounds.min(-1)
        assert float(best_bound) < 1e-12  # a residual test alone would accept both
        passed, count, m, ok = certify(gram, theta, best, mus, r)
        assert bool(passed) is should_pass and bool(ok)
        assert int(count) == int(m) + (0 if should_pass else 1)


def test_solver_started_on_a_subspace_missing_an_eigenvector_still_ends_right():
    # The Krylov extension by A·R explores beyond the start block, so the missed λ_1 is found and certified.
    k, r = 80, 4
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(1), dtype=F64))
    lam = torch.linspace(1, 10, k, dtype=F64)
    gram = ((q * lam) @ q.T)[None]
    p = r + SolverSettings().oversample
    outcome = smallest_eigenpairs(gram, r, start=q[None, :, 1 : p + 1])
    if outcome.certified.all():
        torch.testing.assert_close(outcome.eigenvalues[0], lam[:r], rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------------- accuracy, every spectrum
@settings(max_examples=15, deadline=None)
@given(
    out_features=st.integers(60, 120),
    in_features=st.integers(60, 120),
    r=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_krylov_matches_svd_on_gaussian_matrices(out_features, in_features, r, seed):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed), dtype=F64)
    report = TruncationReport()
    minor = minor_components_krylov(weight, r, report=report)
    assert report.certified + report.fallback + report.direct == 1
    check_against_svd(weight, minor, r)


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(SPECTRUM_KINDS),
    shape=st.sampled_from([(96, 64), (64, 96), (80, 80), (150, 60)]),
    r=st.integers(2, 8),
    seed=st.integers(0, 2**16),
)
def test_krylov_matches_svd_on_hard_spectra(kind, shape, r, seed):
    weight = with_spectrum(*shape, spectrum(kind, min(shape), r, seed), seed)
    report = TruncationReport()
    minor = minor_components_krylov(weight, r, report=report)
    check_against_svd(weight, minor, r)


def test_every_issued_certificate_is_true():
    """Over many spectra, Σθ − Σλ (against eigh) never exceeds the certified bound."""
    grams = []
    for seed, kind in enumerate(SPECTRUM_KINDS * 4):
        w = with_spectrum(120, 90, spectrum(kind, 90, 6, seed), seed)
        grams.append(w.T @ w)
    gram = torch.stack(grams)
    outcome = smallest_eigenpairs(gram, 6)
    optimum = torch.linalg.eigvalsh(gram)[:, :6].sum(-1)
    error = outcome.eigenvalues.sum(-1) - optimum
    delta = 1e-13 * torch.linalg.matrix_norm(gram)
    assert outcome.certified.all(), outcome.reasons
    assert (error[outcome.certified] <= outcome.energy_bound[outcome.certified] + delta[outcome.certified]).all()
    assert (error >= -delta).all()  # Ritz values never undercut the optimum


def test_exact_zero_matrix_and_exact_zero_columns():
    zero = torch.zeros(70, 90, dtype=F64)
    minor = minor_components_krylov(zero, 5)
    assert float(minor.product().abs().max()) == 0.0
    torch.testing.assert_close(minor.minor_vh @ minor.minor_vh.T, torch.eye(5, dtype=F64), atol=1e-10, rtol=0)
    weight = torch.randn(90, 70, generator=torch.Generator().manual_seed(0), dtype=F64)
    weight[:, :10] = 0  # ten exact zero columns: ten exact zero singular values
    check_against_svd(weight, minor_components_krylov(weight, 8), 8)


@pytest.mark.parametrize("shape, r", [((3, 2), 1), ((2, 5), 1), ((20, 12), 11), ((12, 20), 11), ((40, 40), 39)])
def test_tiny_matrices_and_r_equal_k_minus_1_go_dense(shape, r):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    report = TruncationReport()
    minor = minor_components_krylov(weight, r, report=report)
    assert report.direct == 1 and report.certified == 0 and report.fallback == 0
    check_against_svd(weight, minor, r)


def test_float32_weights_are_solved_in_float64():
    weight = torch.randn(128, 128, generator=torch.Generator().manual_seed(0))  # square: hard for a float32 Gram
    minor = minor_components_krylov(weight, 16)
    assert minor.minor_u_sigma.dtype == F64
    check_against_svd(weight.to(F64), minor, 16)


# ------------------------------------------------------------------------------------------- fallback and batching
def test_fallback_where_the_certificate_fails_is_logged_and_exact(caplog, monkeypatch):
    real = spectral.smallest_eigenpairs

    def one_step(gram, r, settings):  # an iteration budget no matrix can be certified in
        return real(gram, r, SolverSettings(max_iterations=1))

    monkeypatch.setattr(spectral, "smallest_eigenpairs", one_step)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(100, 70, generator=generator) for _ in range(3)]
    names = ["a.q", "b.q", "c.q"]
    report = TruncationReport()
    with caplog.at_level(logging.INFO, logger="kasa_peft.spectral"):
        minors = truncate_many(weights, 4, "krylov", names=names, report=report)
    assert report.fallback == 3 and report.certified == 0
    lines = log_records(caplog, "uncertified")
    assert [name for name in names if any(name in rec.getMessage() for rec in lines)] == names
    assert all(rec.levelno == logging.WARNING for rec in lines)
    summary = log_records(caplog, "3 dense fallbacks")
    assert summary and summary[0].levelno == logging.WARNING
    assert_matches_dense_reference(weights, minors, 4)


def test_minor_vh_is_orthonormal_for_wide_weights_with_zero_singular_values():
    """Issue 8 item 7: out < in, rank-deficient — dividing U_rᵀW by σ ≈ 0 gave rows up to 0.95 off orthonormal."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 5, generator=generator, dtype=F64) @ torch.randn(5, 20, generator=generator, dtype=F64)
    for minor in (minor_components_gram_eigh(weight, 4), minor_components_krylov(weight, 4)):
        torch.testing.assert_close(minor.minor_vh @ minor.minor_vh.T, torch.eye(4, dtype=F64), atol=1e-10, rtol=0)
        torch.testing.assert_close(minor.product(), minor_components_svd(weight, 4).product(), atol=1e-10, rtol=0)
