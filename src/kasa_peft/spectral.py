"""Spectral math for KaSA's knowledge-based truncation (no layer or model plumbing here).

For a weight ``W`` (out × in) with SVD ``W = U Σ Vᵀ`` and ``k = min(out, in)``, KaSA drops the ``r`` smallest
singular triplets::

    W_minor = U_r Σ_r V_rᵀ              (the "noisy knowledge", rank r)
    W_world = W − W_minor               (the frozen base the adapter trains against)

This module finds ``W_minor`` as two factors, ``minor_u_sigma = U_r Σ_r`` (out × r) and ``minor_vh = V_rᵀ``
(r × in), by one of these paths:

``"svd"``
    float64 full SVD — the reference. O(out·in·k) and slow for large matrices.
``"partial_eigh"`` (default)
    the same float64 Gram as ``gram_eigh`` (one ``dsyrk``, half a GEMM), but only its r smallest eigenpairs, by
    LAPACK's partial solver (``partial_eigh.py``: tridiagonalisation, bisection by Sturm counts, inverse
    iteration). A direct, backward-stable method like the full ``eigh``, at the cost of the tridiagonal reduction
    alone. Every result is checked (residual against G, orthonormality); a matrix that fails, or that LAPACK did not
    converge, is recomputed by ``gram_eigh`` and logged. CPU only: on another device the weights go to ``gram_eigh``
    on that device (counted as dense in the report), since torch has no partial eigensolver there.
``"gram_eigh"``
    float64 eigendecomposition of the smaller Gram matrix. For out ≥ in, ``G = WᵀW`` (in × in) has eigenpairs
    ``(σ_i², v_i)``; its r smallest eigenvectors span the minor right subspace, and ``W V_r = U_r Σ_r`` directly
    (no division by tiny σ). For out < in, ``G = WWᵀ`` gives ``U_r`` and ``U_rᵀ W = Σ_r V_rᵀ``. Forming G costs one
    matmul and ``eigh`` works on a k × k matrix, so it is several times cheaper than a full SVD, and it batches over
    same-shaped weights. float64 matters: eigenvalues of G carry absolute error ≈ ε·σ_max², so in float32 the minor
    subspace of a real weight is unresolvable; in float64 the error is ≈ 1e-16·σ_max², far below typical gaps.
``"krylov"``
    the same float64 Gram, but only its r smallest eigenpairs, by certified shift-invert block Krylov iteration
    (``minor_solver.py``): Cholesky of G − sI, block solves + QR, Rayleigh–Ritz, then a Sylvester-inertia
    certificate (``ldl_factor``) that bounds the dropped energy ``‖W V_r‖²_F`` within 1e-8 (relative) of the
    optimum. Any matrix whose certificate fails is recomputed by ``gram_eigh`` and logged (one WARNING line per
    matrix and a summary), never silently. Small problems (block ≥ k/2) go straight to ``gram_eigh``.

For out < in, the rows ``Σ_r V_rᵀ = U_rᵀ W`` are turned into orthonormal ``V_rᵀ`` by a thin SVD of that r × in
matrix (not by dividing by σ, which leaves non-orthonormal rows where σ ≈ 0), so ``minor_vh`` always has
orthonormal rows and ``minor_u_sigma`` has orthogonal columns.

Both paths return the factors in the SVD's order (largest dropped σ first) and in the canonical form
``(U_r Σ_r, V_rᵀ)``; individual singular vectors are only defined up to sign (and, for repeated σ, rotation), so
compare products, not factors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from .minor_solver import SolverSettings, smallest_eigenpairs

logger = logging.getLogger(__name__)

TruncationMethod = Literal["partial_eigh", "gram_eigh", "svd", "krylov"]
TRUNCATION_METHODS: tuple[str, ...] = ("partial_eigh", "gram_eigh", "svd", "krylov")
DEFAULT_TRUNCATION_METHOD: TruncationMethod = "partial_eigh"

# Upper bound on the float64 working set of one batched eigh call; keeps a 7B model's 4096² weights
# (128 MiB each in float64) from being stacked all at once.
DEFAULT_MAX_BATCH_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class MinorComponents:
    """The rank-r part of a weight that KaSA drops: ``W_minor = minor_u_sigma @ minor_vh``.

    Attributes:
        minor_u_sigma: ``U_r Σ_r``, shape (out, r).
        minor_vh: ``V_rᵀ``, shape (r, in), orthonormal rows (also where σ = 0).
        singular_values: ``σ`` of the dropped triplets, shape (r,), descending.
    """

    minor_u_sigma: torch.Tensor
    minor_vh: torch.Tensor
    singular_values: torch.Tensor

    def product(self) -> torch.Tensor:
        """``W_minor = U_r Σ_r V_rᵀ``, shape (out, in)."""
        return self.minor_u_sigma @ self.minor_vh

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "MinorComponents":
        return MinorComponents(
            self.minor_u_sigma.to(dtype=dtype, device=device),
            self.minor_vh.to(dtype=dtype, device=device),
            self.singular_values.to(dtype=dtype, device=device),
        )


def check_truncation_rank(r: int, shape: Sequence[int], name: str = "weight") -> None:
    """Raise ``ValueError`` unless ``0 < r < min(shape)`` (KaSA keeps at least one principal component)."""
    out_features, in_features = int(shape[-2]), int(shape[-1])
    k = min(out_features, in_features)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"KaSA rank r must be a positive integer, got {r!r} for {name}.")
    if r >= k:
        raise ValueError(
            f"KaSA rank r={r} is too large for {name} of shape ({out_features}×{in_features}): r must be smaller "
            f"than min(out, in) = {k} so that at least one principal component survives truncation. "
            f"Use r <= {k - 1}, or exclude this module from target_modules."
        )


def minor_components_svd(weight: torch.Tensor, r: int) -> MinorComponents:
    """Reference path: float64 full SVD of ``weight`` (out × in); returns the r smallest triplets."""
    check_truncation_rank(r, weight.shape)
    w64 = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    k = s.shape[-1]
    return MinorComponents(
        minor_u_sigma=u[..., :, k - r :] * s[..., None, k - r :],
        minor_vh=vh[..., k - r :, :],
        singular_values=s[..., k - r :],
    )


@dataclass
class TruncationReport:
    """What the truncation of a set of weights did, per path (filled by ``truncate_many``).

    Attributes:
        certified: matrices solved by a minor-only path (``krylov``, ``partial_eigh``) that passed its certificate
            or check.
        fallback: matrices whose certificate or check failed and that were recomputed by the dense path.
        direct: matrices sent straight to a dense path (method ``gram_eigh``/``svd``, a problem too small to iterate,
            or ``partial_eigh`` on a non-CPU device).
        iterations: block solves per matrix certified by ``krylov``.
        fallback_reasons: "name: reason" per fallback.
    """

    certified: int = 0
    fallback: int = 0
    direct: int = 0
    iterations: list[int] = field(default_factory=list)
    fallback_reasons: list[str] = field(default_factory=list)


def _gram(w64: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix: WᵀW (in × in) for out ≥ in, else WWᵀ (out × out)."""
    return w64.mT @ w64 if w64.shape[-2] >= w64.shape[-1] else w64 @ w64.mT


def _components_from_gram_vectors(w64: torch.Tensor, vectors: torch.Tensor) -> MinorComponents:
    """Canonical factors from the r minor eigenvectors of the smaller Gram (…, k, r), largest dropped σ first.

    out ≥ in: vectors = V_r, ``U_rΣ_r = W V_r``. out < in: vectors = U_r, ``Σ_rV_rᵀ = U_rᵀW`` (r × in), whose thin SVD
    P S Qᵀ gives ``W_minor = (U_rP)·S·Qᵀ`` with orthonormal rows Qᵀ even where σ ≈ 0 (dividing the rows by σ does not).
    """
    if w64.shape[-2] >= w64.shape[-1]:
        u_sigma = w64 @ vectors  # (…, out, r) = U_r Σ_r
        # Column norms of W V_r are the σ themselves, computed without the ε·σ_max² error of sqrt(eigenvalue).
        sigma = torch.linalg.vector_norm(u_sigma, dim=-2)
        return MinorComponents(minor_u_sigma=u_sigma, minor_vh=vectors.mT, singular_values=sigma)
    sigma_vh = vectors.mT @ w64  # (…, r, in) = Σ_r V_rᵀ
    p, sigma, qh = torch.linalg.svd(sigma_vh, full_matrices=False)  # descending σ
    return MinorComponents(minor_u_sigma=(vectors @ p) * sigma[..., None, :], minor_vh=qh, singular_values=sigma)


def minor_components_gram_eigh(weight: torch.Tensor, r: int) -> MinorComponents:
    """Fast path: float64 Gram matrix + ``eigh``. ``weight`` is (out × in) or a batch (b × out × in).

    Implements, for out ≥ in: ``V_r`` = eigenvectors of the r smallest eigenvalues of ``WᵀW``;
    ``U_r Σ_r = W V_r``; σ = column norms of ``W V_r``. For out < in the roles swap via ``WWᵀ``.
    """
    check_truncation_rank(r, weight.shape)
    w64 = weight.detach().to(torch.float64)
    _, eigenvectors = torch.linalg.eigh(_gram(w64))  # ascending eigenvalues
    return _components_from_gram_vectors(w64, eigenvectors[..., :, :r].flip(-1))


def _raise_non_finite(weights: torch.Tensor, names: Sequence[str] | None) -> None:
    """Called only when a fused reduction came out non-finite: find and name the culprit (or return if none)."""
    bad = ~torch.isfinite(weights).flatten(1).all(-1) if weights.ndim == 3 else ~torch.isfinite(weights).all()[None]
    for offset, is_bad in enumerate(bad.tolist()):
        if is_bad:
            if names is not None:
                raise ValueError(
                    f"Module {names[offset]!r} has NaN/Inf weights; KaSA's truncation needs finite weights. "
                    "Check the checkpoint you loaded."
                )
            raise ValueError("KaSA truncation needs finite weights, but the weight contains NaN or Inf.")


def minor_components_krylov(
    weight: torch.Tensor,
    r: int,
    settings: SolverSettings = SolverSettings(),
    names: Sequence[str] | None = None,
    report: TruncationReport | None = None,
) -> MinorComponents:
    """Iterative path: float64 Gram + certified shift-invert block Krylov (``minor_solver``), dense where uncertified.

    ``weight`` is (out × in) or a batch (b × out × in). ``names`` (one per matrix) label the fallback log lines.
    """
    check_truncation_rank(r, weight.shape)
    single = weight.ndim == 2
    w64 = weight.detach().to(torch.float64)
    if single:
        w64 = w64[None]
    gram = _gram(w64)
    # One fused finiteness check per batch: trace(G) = ‖W‖²_F is non-finite iff some entry is (or ‖W‖_F overflows).
    if not bool(torch.isfinite(gram.diagonal(dim1=-2, dim2=-1).sum())):
        _raise_non_finite(w64, names)
    report = report if report is not None else TruncationReport()
    b, k = gram.shape[0], gram.shape[-1]
    if 2 * min(k, r + settings.oversample) >= k:  # the block would be half the matrix: dense is cheaper
        _, eigenvectors = torch.linalg.eigh(gram)
        report.direct += b
        minor = _components_from_gram_vectors(w64, eigenvectors[..., :, :r].flip(-1))
    else:
        outcome = smallest_eigenpairs(gram, r, settings)
        vectors = outcome.eigenvectors
        failed = torch.nonzero(~outcome.certified).flatten()
        if len(failed):
            _, dense = torch.linalg.eigh(gram[failed])
            vectors = vectors.clone()
            vectors[failed] = dense[..., :, :r]
            for index in failed.tolist():
                label = names[index] if names is not None else f"matrix {index} of a batch of {b}"
                _log_fallback(report, label, w64.shape, "krylov", f"uncertified: {outcome.reasons[index]}")
        report.fallback += len(failed)
        certified_iterations = outcome.iterations[outcome.certified]
        report.certified += len(certified_iterations)
        report.iterations.extend(certified_iterations.tolist())
        minor = _components_from_gram_vectors(w64, vectors.flip(-1))
    if single:
        return MinorComponents(minor.minor_u_sigma[0], minor.minor_vh[0], minor.singular_values[0])
    return minor


def _log_fallback(report: TruncationReport, label: str, shape: Sequence[int], path: str, reason: str) -> None:
    logger.warning(
        "KaSA truncation: %s (%d×%d) not solved by the %s path (%s); used the exact dense eigh.",
        label, shape[-2], shape[-1], path, reason,
    )
    report.fallback_reasons.append(f"{label}: {reason}")


def minor_components_partial_eigh(
    weight: torch.Tensor,
    r: int,
    names: Sequence[str] | None = None,
    report: TruncationReport | None = None,
) -> MinorComponents:
    """Default path: float64 Gram + LAPACK's partial eigensolver for the r smallest eigenpairs only (CPU).

    ``weight`` is (out × in) or a batch (b × out × in). Implements the same equations as ``gram_eigh`` (V_r = the r
    minor eigenvectors of WᵀW, ``U_rΣ_r = W V_r``; WWᵀ for out < in), one matrix at a time (LAPACK is not batched,
    and a float64 copy of one matrix stays in cache). Each result is checked (``partial_eigh.eigenpairs_hold``); a
    failure is recomputed by the dense ``eigh``, logged and counted in ``report``. ``names`` (one per matrix) label
    the log and error lines. Off the CPU this is ``gram_eigh`` on the weight's device, counted as dense.
    """
    from .partial_eigh import lapack_threads, partial_minor

    check_truncation_rank(r, weight.shape)
    report = report if report is not None else TruncationReport()
    single = weight.ndim == 2
    if weight.device.type != "cpu":
        _check_finite(weight, names)
        report.direct += 1 if single else weight.shape[0]
        return minor_components_gram_eigh(weight, r)
    batch = weight.detach()[None] if single else weight.detach()
    found: list[MinorComponents] = []
    with lapack_threads():
        for index in range(batch.shape[0]):
            # NumPy has no bfloat16: other dtypes are cast by torch, float32/float64 by NumPy (≈ 5× faster).
            matrix = batch[index]
            if matrix.dtype in (torch.float32, torch.float64):
                w64 = np.ascontiguousarray(matrix.numpy(), dtype=np.float64)
            else:
                w64 = matrix.to(torch.float64).contiguous().numpy()
            result = partial_minor(w64, r)
            if not math.isfinite(result.squared_norm):
                _raise_non_finite(batch, names)
            if result.reason is None:
                report.certified += 1
                found.append(MinorComponents(result.minor_u_sigma, result.minor_vh, result.singular_values))
                continue
            label = names[index] if names is not None else f"matrix {index} of a batch of {batch.shape[0]}"
            _log_fallback(report, label, batch.shape, "partial_eigh", result.reason)
            report.fallback += 1
            found.append(minor_components_gram_eigh(torch.from_numpy(w64), r))
    if single:
        return found[0]
    return MinorComponents(
        torch.stack([m.minor_u_sigma for m in found]),
        torch.stack([m.minor_vh for m in found]),
        torch.stack([m.singular_values for m in found]),
    )


def _check_finite(weight: torch.Tensor, names: Sequence[str] | None = None) -> None:
    # One fused reduction (a float64 sum cannot overflow for float32/bf16/fp16 entries); the exact check runs only
    # when it comes out non-finite.
    if not bool(torch.isfinite(weight.detach().sum(dtype=torch.float64))):
        _raise_non_finite(weight.detach(), names)


def truncate_minor_components(
    weight: torch.Tensor,
    r: int,
    method: TruncationMethod = DEFAULT_TRUNCATION_METHOD,
    names: Sequence[str] | None = None,
    report: TruncationReport | None = None,
) -> MinorComponents:
    """Find the r smallest singular triplets of ``weight`` (out × in, or a batch) with the chosen path, in float64."""
    if method not in TRUNCATION_METHODS:
        raise ValueError(f"Unknown truncation method {method!r}; choose one of {TRUNCATION_METHODS}.")
    if method == "krylov":
        return minor_components_krylov(weight, r, names=names, report=report)
    if method == "partial_eigh":
        return minor_components_partial_eigh(weight, r, names=names, report=report)
    _check_finite(weight, names)
    if report is not None:
        report.direct += weight.shape[0] if weight.ndim == 3 else 1
    if method == "gram_eigh":
        return minor_components_gram_eigh(weight, r)
    return minor_components_svd(weight, r)


def truncate_many(
    weights: Sequence[torch.Tensor],
    r: int,
    method: TruncationMethod = DEFAULT_TRUNCATION_METHOD,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    names: Sequence[str] | None = None,
    report: TruncationReport | None = None,
) -> list[MinorComponents]:
    """Truncate several weights, batching same-shaped, same-device ones into one float64 call per chunk.

    Returns one ``MinorComponents`` per input weight, in input order. Batching only changes speed, not results
    beyond float64 round-off. ``max_batch_bytes`` bounds the float64 working set of one call (the weights, the Gram
    matrix and, for ``krylov``, its Cholesky/LDL factors). ``names`` label error and fallback messages; ``report``
    (optional) is filled with what each path did. With ``krylov`` a summary is logged: INFO when every matrix was
    certified, WARNING when some fell back to the dense path.
    """
    report = report if report is not None else TruncationReport()
    results: list[MinorComponents | None] = [None] * len(weights)
    groups: dict[tuple, list[int]] = {}
    if method == "partial_eigh":
        from .partial_eigh import lapack_threads

        # LAPACK works on one matrix at a time: CPU weights are not stacked (a float64 stack of a model's MLP weights
        # costs more to build than the Gram of one of them).
        with lapack_threads():
            for index, weight in enumerate(weights):
                if weight.device.type == "cpu":
                    label = [names[index]] if names is not None else None
                    results[index] = minor_components_partial_eigh(weight, r, names=label, report=report)
    for index, weight in enumerate(weights):
        if results[index] is None:
            groups.setdefault((tuple(weight.shape), weight.device), []).append(index)
    for (shape, _device), indices in groups.items():
        factors = 3 if method == "krylov" else 1
        per_matrix_bytes = 8 * (shape[0] * shape[1] + factors * min(shape) ** 2)
        chunk = max(1, max_batch_bytes // per_matrix_bytes) if method != "svd" else 1
        for start in range(0, len(indices), chunk):
            chunk_indices = indices[start : start + chunk]
            stacked = torch.stack([weights[i].detach() for i in chunk_indices])
            chunk_names = [names[i] for i in chunk_indices] if names is not None else None
            minor = truncate_minor_components(stacked, r, method, names=chunk_names, report=report)
            for offset, i in enumerate(chunk_indices):
                results[i] = MinorComponents(
                    minor.minor_u_sigma[offset], minor.minor_vh[offset], minor.singular_values[offset]
                )
    if method == "krylov" and weights:
        iterations = report.iterations
        summary = (
            f"KaSA truncation (krylov): {len(weights)} matrices, {report.certified} certified iteratively"
            f"{f' (block solves {min(iterations)}–{max(iterations)})' if iterations else ''}, "
            f"{report.fallback} dense fallbacks, {report.direct} dense because small."
        )
        logger.log(logging.WARNING if report.fallback else logging.INFO, summary)
    elif method == "partial_eigh" and weights:
        summary = (
            f"KaSA truncation (partial_eigh): {len(weights)} matrices, {report.certified} by the partial "
            f"eigensolver and checked, {report.fallback} dense fallbacks, {report.direct} dense off the CPU."
        )
        logger.log(logging.WARNING if report.fallback else logging.INFO, summary)
    return results  # type: ignore[return-value]


def principal_angle_cosine(basis_a: torch.Tensor, basis_b: torch.Tensor) -> float:
    """Smallest principal-angle cosine between the column spans of two (n × r) matrices (1.0 = same subspace)."""
    qa, _ = torch.linalg.qr(basis_a.to(torch.float64))
    qb, _ = torch.linalg.qr(basis_b.to(torch.float64))
    return float(torch.linalg.svdvals(qa.mT @ qb).min())
