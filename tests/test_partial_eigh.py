"""The default truncation path ('partial_eigh': float64 Gram + LAPACK's partial eigensolver) against a float64 SVD.

Same acceptance as every path (``_spectra.check_against_svd``): dropped energy within 1e-6 (relative) of the
optimum, W_world within 1e-6 of the reference where σ_{r+1}/σ_r ≥ 1.01, orthonormal minor_vh. Plus: the
a-posteriori check rejects what is not an eigenpair, the dense fallback runs where (and only where) LAPACK's result
is rejected, and it is logged. Real weights and the end-to-end comparison: ``test_truncation_paths.py``.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.linalg.lapack
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

import kasa_peft.partial_eigh as partial_eigh
from kasa_peft.partial_eigh import eigenpairs_hold, gram_upper, lapack_threads, partial_minor
from kasa_peft.spectral import (
    TruncationReport,
    minor_components_partial_eigh,
    minor_components_svd,
    truncate_many,
)


def _solve(weight: torch.Tensor, r: int):
    report = TruncationReport()
    minor = minor_components_partial_eigh(weight, r, report=report)
    return minor, report


# ------------------------------------------------------------------------------------------------ the pieces
@pytest.mark.parametrize("shape", [(30, 12), (12, 30), (17, 17)])
def test_gram_upper_is_the_smaller_gram_upper_triangle(shape):
    weight = np.random.default_rng(0).standard_normal(shape)
    gram = gram_upper(weight)
    expected = weight.T @ weight if shape[0] >= shape[1] else weight @ weight.T
    assert gram.shape == (min(shape), min(shape))
    np.testing.assert_allclose(np.triu(gram), np.triu(expected), rtol=1e-12, atol=1e-12)


def test_eigenpairs_hold_accepts_true_pairs_and_rejects_each_kind_of_wrong_one():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((50, 40))
    gram = weight.T @ weight
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    lam, vectors, scale = eigenvalues[:5], eigenvectors[:, :5], float(np.trace(gram))
    assert eigenpairs_hold(gram, lam, vectors, scale)
    shifted = lam.copy()
    shifted[2] += 1e-6 * scale  # a wrong eigenvalue: residual ‖λ'−λ‖ = 1e-6·tr G
    assert not eigenpairs_hold(gram, shifted, vectors, scale)
    tilted = vectors.copy()
    tilted[:, 1] = (vectors[:, 1] + 1e-6 * eigenvectors[:, 20]) / np.sqrt(1 + 1e-12)  # unit, but not an eigenvector
    assert not eigenpairs_hold(gram, lam, tilted, scale)
    repeated = vectors.copy()
    repeated[:, 4], lam_repeated = vectors[:, 3], lam.copy()
    lam_repeated[4] = lam[3]  # every column an exact eigenpair, but two of them the same vector
    assert not eigenpairs_hold(gram, lam_repeated, repeated, scale)


def test_eigenpairs_hold_bounds_each_column_residual_at_the_documented_tolerance():
    # G = diag(λ) plus off-diagonal entries c·tol·tr G linking each of the 5 claimed vectors e_i to one shared row
    # j = 30: every column's residual is exactly c·tol·tr G, while the row-30 and whole-matrix norms are √5 times that.
    k, r, j = 40, 5, 30
    tolerance = partial_eigh.CHECK_SLACK * k * partial_eigh.EPS64
    lam = np.linspace(1.0, 2.0, k)
    for factor, expected in ((0.6, True), (1.5, False)):
        gram = np.diag(lam)
        scale = float(np.trace(gram))  # the off-diagonal coupling leaves the trace alone
        gram[j, :r] = gram[:r, j] = factor * tolerance * scale
        assert eigenpairs_hold(gram, lam[:r], np.eye(k)[:, :r], scale) is expected, factor


def test_partial_minor_reports_a_non_finite_weight_instead_of_solving():
    weight = np.ones((12, 8))
    weight[3, 2] = np.nan
    result = partial_minor(weight, 2)
    assert not np.isfinite(result.squared_norm)
    assert result.reason == "non-finite weight" and result.minor_u_sigma is None


def test_partial_minor_gives_the_svd_factors_for_tall_and_wide_weights():
    rng = np.random.default_rng(2)
    for shape in [(60, 40), (40, 60)]:
        weight = rng.standard_normal(shape)
        result = partial_minor(weight, 6)
        assert result.reason is None
        reference = minor_components_svd(torch.from_numpy(weight), 6)
        torch.testing.assert_close(result.singular_values, reference.singular_values, rtol=1e-10, atol=0)
        torch.testing.assert_close(result.minor_u_sigma @ result.minor_vh, reference.product(), rtol=0, atol=1e-10)
        assert result.squared_norm == pytest.approx(float((weight**2).sum()), rel=1e-12)


def test_lapack_threads_follows_torch_and_is_reentrant():
    from threadpoolctl import threadpool_info

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with lapack_threads():
            with lapack_threads():
                inner = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
            after_inner = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        assert inner and set(inner) == {1}
        assert set(after_inner) == {1}  # leaving the nested block keeps the outer limit
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------- accuracy, every spectrum
@settings(max_examples=30, deadline=None)
@given(
    out_features=st.integers(2, 120),
    in_features=st.integers(2, 120),
    r_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_matches_svd_on_gaussian_matrices_of_every_shape_and_rank(out_features, in_features, r_fraction, seed):
    k = min(out_features, in_features)
    r = 1 + int(r_fraction * (k - 2)) if k > 2 else 1  # 1 … k−1
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed), dtype=F64)
    minor, report = _solve(weight, r)
    assert (report.certified, report.fallback) == (1, 0), report.fallback_reasons
    check_against_svd(weight, minor, r)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(SPECTRUM_KINDS),
    shape=st.sampled_from([(96, 64), (64, 96), (80, 80), (150, 60), (30, 200)]),
    r=st.integers(2, 12),
    seed=st.integers(0, 2**16),
)
def test_matches_svd_on_hard_spectra(kind, shape, r, seed):
    weight = with_spectrum(*shape, spectrum(kind, min(shape), r, seed), seed)
    minor, report = _solve(weight, r)
    assert report.fallback == 0, report.fallback_reasons
    check_against_svd(weight, minor, r)


@pytest.mark.parametrize("shape, r", [((3, 2), 1), ((2, 5), 1), ((20, 12), 11), ((12, 20), 11), ((40, 40), 39)])
def test_tiny_matrices_and_r_equal_k_minus_1(shape, r):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    minor, report = _solve(weight, r)
    assert report.certified == 1
    check_against_svd(weight, minor, r)


def test_exact_zero_matrix_and_exact_zero_columns_and_rows():
    zero = torch.zeros(70, 90, dtype=F64)
    minor, _ = _solve(zero, 5)
    assert float(minor.product().abs().max()) == 0.0
    torch.testing.assert_close(minor.minor_vh @ minor.minor_vh.T, torch.eye(5, dtype=F64), atol=1e-10, rtol=0)
    generator = torch.Generator().manual_seed(0)
    tall = torch.randn(90, 70, generator=generator, dtype=F64)
    tall[:, :10] = 0  # ten exact zero singular values, r = 8 of them dropped
    check_against_svd(tall, _solve(tall, 8)[0], 8)
    wide = torch.randn(40, 90, generator=generator, dtype=F64)
    wide[:6] = 0
    check_against_svd(wide, _solve(wide, 8)[0], 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_weights_are_solved_in_float64(dtype):
    weight = torch.randn(96, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    minor, _ = _solve(weight, 16)
    assert minor.minor_u_sigma.dtype == F64
    check_against_svd(weight.to(F64), minor, 16)


def test_non_contiguous_and_batched_weights():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(50, 80, generator=generator)
    single, _ = _solve(weight.T, 6)  # a transposed view, as Conv1D weights are read
    check_against_svd(weight.T.to(F64), single, 6)
    batch = torch.randn(3, 40, 30, generator=generator)
    minor, report = _solve(batch, 4)
    assert minor.minor_u_sigma.shape == (3, 40, 4) and report.certified == 3
    for index in range(3):
        reference = minor_components_svd(batch[index], 4)
        torch.testing.assert_close(minor.minor_u_sigma[index] @ minor.minor_vh[index], reference.product(),
                                   rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------- fallback and logging
@pytest.mark.parametrize("failure", ["rejected", "not_converged"])
def test_fallback_where_lapack_result_is_rejected_is_logged_and_exact(failure, caplog, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(100, 70, generator=generator) for _ in range(3)]
    names = ["a.q", "b.q", "c.q"]
    failing = {1}  # only the second matrix fails
    calls = {"n": 0}
    if failure == "rejected":
        real_check = partial_eigh.eigenpairs_hold

        def check(gram, eigenvalues, eigenvectors, scale):
            calls["n"] += 1
            return False if calls["n"] - 1 in failing else real_check(gram, eigenvalues, eigenvectors, scale)

        monkeypatch.setattr(partial_eigh, "eigenpairs_hold", check)
    else:
        real_solver = scipy.linalg.lapack.dsyevr

        def solver(*args, **kwargs):
            calls["n"] += 1
            eigenvalues, eigenvectors, found, support, info = real_solver(*args, **kwargs)
            return eigenvalues, eigenvectors, found, support, 2 if calls["n"] - 1 in failing else info

        monkeypatch.setattr(scipy.linalg.lapack, "dsyevr", solver)
    report = TruncationReport()
    with caplog.at_level(logging.INFO, logger="kasa_peft.spectral"):
        minors = truncate_many(weights, 4, "partial_eigh", names=names, report=report)
    assert (report.certified, report.fallback) == (2, 1)
    fallback_lines = log_records(caplog, "not solved by the partial_eigh path")
    assert len(fallback_lines) == 1 and "b.q" in fallback_lines[0].getMessage()
    assert fallback_lines[0].levelno == logging.WARNING
    expected_reason = "check failed" if failure == "rejected" else "info=2"
    assert expected_reason in report.fallback_reasons[0] and report.fallback_reasons[0].startswith("b.q")
    summary = log_records(caplog, "1 dense fallbacks")
    assert summary and summary[0].levelno == logging.WARNING
    assert_matches_dense_reference(weights, minors, 4)
