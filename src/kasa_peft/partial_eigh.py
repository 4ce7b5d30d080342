"""The r smallest eigenpairs of a weight's float64 Gram matrix by LAPACK's partial symmetric eigensolver (CPU).

KaSA needs only the r minor singular triplets of each weight ``W`` (out × in, k = min(out, in)). A full ``eigh`` of
the Gram matrix computes all k eigenvectors and back-transforms all of them; the r smallest need little beyond the
reduction to tridiagonal form. Per matrix, in float64::

    G = WᵀW (out ≥ in) or WWᵀ     one BLAS ``dsyrk``: the upper triangle only, half the flops of a GEMM
    T = Qᵀ G Q                     Householder tridiagonalisation (``dsytrd``, 4/3·k³ flops)
    λ_1 ≤ … ≤ λ_r                  bisection on T (``dstebz``): each step is a Sturm count, i.e. the Sylvester
                                   inertia of T − μI, so the r values found are the r smallest of T to ≈ ε‖G‖
    v_1 … v_r                      inverse iteration on T (``dstein``, re-orthogonalised within clusters),
                                   back-transformed by Q (4·k²·r flops)

This is LAPACK's ``dsyevr`` with ``range='I'`` (for a partial spectrum it runs ``dstebz`` + ``dstein``). It is a
direct, backward-stable method with the same accuracy class as the full ``eigh``: the pairs are exact for a matrix
within ≈ k·ε·‖G‖ of G, which is also how exactly G itself is known. What it is not guaranteed to do is converge:
``dstein`` reports vectors that did not (``info > 0``), and every result is also checked a posteriori
(``eigenpairs_hold``: residual against G and orthonormality); the caller recomputes any matrix that fails with the
dense ``eigh``, logged.

SciPy's LAPACK runs in its own BLAS thread pool; ``lapack_threads`` holds it to torch's thread count, so
``torch.set_num_threads`` is the one knob for the whole init.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

EPS64 = float(np.finfo(np.float64).eps)
# Slack on the a-posteriori check: LAPACK's residuals and orthogonality are ≈ k·ε (relative to ‖G‖); 64× that
# still rejects anything that is not an eigenpair to ~11 digits.
CHECK_SLACK = 64.0


@dataclass(frozen=True)
class PartialMinor:
    """The r minor singular triplets of one weight from its Gram's r smallest eigenpairs, or why there are none.

    Attributes:
        minor_u_sigma: ``U_r Σ_r`` (out × r), float64, largest dropped σ first (``None`` when ``reason`` is set).
        minor_vh: ``V_rᵀ`` (r × in), orthonormal rows (``None`` when ``reason`` is set).
        singular_values: σ of the dropped triplets (r,), descending (``None`` when ``reason`` is set).
        squared_norm: ``‖W‖²_F = tr G`` (non-finite iff W has a NaN/Inf entry).
        reason: why LAPACK's result was not used (no convergence, failed check), else ``None``.
    """

    minor_u_sigma: torch.Tensor | None
    minor_vh: torch.Tensor | None
    singular_values: torch.Tensor | None
    squared_norm: float
    reason: str | None = None


def gram_upper(weight64: np.ndarray) -> np.ndarray:
    """Upper triangle of the smaller Gram matrix of ``weight64`` (out × in, float64, C order): k × k, Fortran order.

    ``G = WᵀW`` for out ≥ in, else ``WWᵀ``. A C-ordered (out × in) array is the Fortran-ordered (in × out) array
    ``Wᵀ``, so it is handed to ``dsyrk`` as ``Wᵀ`` without a copy: ``trans=0`` gives (Wᵀ)(Wᵀ)ᵀ = WᵀW and
    ``trans=1`` gives (Wᵀ)ᵀ(Wᵀ) = WWᵀ. The lower triangle is left unset (LAPACK reads the upper one).
    """
    from scipy.linalg import blas

    out_features, in_features = weight64.shape
    return blas.dsyrk(1.0, weight64.T, trans=0 if out_features >= in_features else 1, lower=0)


def eigenpairs_hold(gram: np.ndarray, eigenvalues: np.ndarray, eigenvectors: np.ndarray, scale: float) -> bool:
    """A-posteriori check of claimed eigenpairs of ``gram`` (k × k, upper triangle set) with (k × r) vectors.

    True when ``‖VᵀV − I‖_max ≤ c·k·ε`` and every column has ``‖G v − λ v‖₂ ≤ c·k·ε·scale``; the caller passes
    ``scale = tr G = ‖W‖²_F ≥ ‖G‖₂``. A backward-stable solver meets both with ≈ 1/c to spare. Costs 2·k²·r flops.
    """
    from scipy.linalg import blas

    k, r = eigenvectors.shape
    tolerance = CHECK_SLACK * k * EPS64
    residual = blas.dsymm(1.0, gram, eigenvectors, side=0, lower=0) - eigenvectors * eigenvalues
    if not np.all(np.linalg.norm(residual, axis=0) <= tolerance * scale):
        return False
    return bool(np.abs(blas.dgemm(1.0, eigenvectors, eigenvectors, trans_a=1) - np.eye(r)).max() <= tolerance)


def partial_minor(weight64: np.ndarray, r: int) -> PartialMinor:
    """KaSA's r minor triplets of one float64 weight (out × in, C order) by ``dsyevr`` on its Gram, checked.

    out ≥ in: ``V_r`` = the r minor eigenvectors of WᵀW, ``U_rΣ_r = W V_r``, σ = its column norms (no square root of
    an eigenvalue, which carries ε·σ_max² error). out < in: ``U_r`` from WWᵀ, then the thin SVD ``P S Qᵀ`` of the
    r × in rows ``U_rᵀW = Σ_rV_rᵀ`` gives ``(U_rP·S, Qᵀ)`` with orthonormal rows even where σ ≈ 0.
    """
    from scipy.linalg import blas, lapack, svd

    gram = gram_upper(weight64)
    squared_norm = float(np.trace(gram))
    if not np.isfinite(squared_norm):
        return PartialMinor(None, None, None, squared_norm, "non-finite weight")
    eigenvalues, eigenvectors, found, _, info = lapack.dsyevr(
        gram, compute_v=1, range="I", il=1, iu=r, lower=0, overwrite_a=0
    )
    if info != 0 or found != r:
        return PartialMinor(None, None, None, squared_norm, f"LAPACK dsyevr info={info}, {found} of {r} eigenpairs")
    eigenvalues, eigenvectors = eigenvalues[:r], eigenvectors[:, :r]
    if not eigenpairs_hold(gram, eigenvalues, eigenvectors, squared_norm):
        return PartialMinor(None, None, None, squared_norm, "residual or orthonormality check failed")
    vectors = eigenvectors[:, ::-1].copy()  # largest dropped σ first, as the SVD orders them (copy: no negative strides)
    if weight64.shape[0] >= weight64.shape[1]:
        u_sigma = blas.dgemm(1.0, weight64, vectors)
        sigma = np.linalg.norm(u_sigma, axis=0)
        return PartialMinor(
            torch.from_numpy(u_sigma), torch.from_numpy(np.ascontiguousarray(vectors.T)), torch.from_numpy(sigma),
            squared_norm,
        )
    p, sigma, qh = svd(blas.dgemm(1.0, vectors, weight64, trans_a=1), full_matrices=False, check_finite=False)
    u_sigma = blas.dgemm(1.0, vectors, p) * sigma
    return PartialMinor(torch.from_numpy(u_sigma), torch.from_numpy(np.ascontiguousarray(qh)), torch.from_numpy(sigma),
                        squared_norm)


_thread_limit_depth = threading.local()


@contextlib.contextmanager
def lapack_threads() -> Iterator[None]:
    """Hold SciPy's BLAS/LAPACK thread pool to ``torch.get_num_threads()`` for the duration (re-entrant).

    Entering ``threadpoolctl``'s limit costs ≈ 1 ms, so nested uses (``truncate_many`` around the per-matrix calls)
    enter it once.
    """
    depth = getattr(_thread_limit_depth, "value", 0)
    if depth:
        _thread_limit_depth.value = depth + 1
        try:
            yield
        finally:
            _thread_limit_depth.value = depth
        return
    from threadpoolctl import threadpool_limits

    _thread_limit_depth.value = 1
    try:
        with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
            yield
    finally:
        _thread_limit_depth.value = 0
