"""Spectral math for KaSA's knowledge-based truncation (no layer or model plumbing here).

For a weight ``W`` (out × in) with SVD ``W = U Σ Vᵀ`` and ``k = min(out, in)``, KaSA drops the ``r`` smallest
singular triplets::

    W_minor = U_r Σ_r V_rᵀ              (the "noisy knowledge", rank r)
    W_world = W − W_minor               (the frozen base the adapter trains against)

This module finds ``W_minor`` as two factors, ``minor_u_sigma = U_r Σ_r`` (out × r) and ``minor_vh = V_rᵀ``
(r × in), by one of two paths:

``"svd"``
    float64 full SVD — the reference. O(out·in·k) and slow for large matrices.
``"gram_eigh"`` (default)
    float64 eigendecomposition of the smaller Gram matrix. For out ≥ in, ``G = WᵀW`` (in × in) has eigenpairs
    ``(σ_i², v_i)``; its r smallest eigenvectors span the minor right subspace, and ``W V_r = U_r Σ_r`` directly
    (no division by tiny σ). For out < in, ``G = WWᵀ`` gives ``U_r`` and ``U_rᵀ W = Σ_r V_rᵀ``. Forming G costs one
    matmul and ``eigh`` works on a k × k matrix, so it is several times cheaper than a full SVD, and it batches over
    same-shaped weights. float64 matters: eigenvalues of G carry absolute error ≈ ε·σ_max², so in float32 the minor
    subspace of a real weight is unresolvable; in float64 the error is ≈ 1e-16·σ_max², far below typical gaps.

Both paths return the factors in the SVD's order (largest dropped σ first) and in the canonical form
``(U_r Σ_r, V_rᵀ)``; individual singular vectors are only defined up to sign (and, for repeated σ, rotation), so
compare products, not factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

TruncationMethod = Literal["gram_eigh", "svd"]
TRUNCATION_METHODS: tuple[str, ...] = ("gram_eigh", "svd")

# Upper bound on the float64 working set of one batched eigh call; keeps a 7B model's 4096² weights
# (128 MiB each in float64) from being stacked all at once.
DEFAULT_MAX_BATCH_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class MinorComponents:
    """The rank-r part of a weight that KaSA drops: ``W_minor = minor_u_sigma @ minor_vh``.

    Attributes:
        minor_u_sigma: ``U_r Σ_r``, shape (out, r).
        minor_vh: ``V_rᵀ``, shape (r, in), orthonormal rows (a zero row where σ = 0).
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


def minor_components_gram_eigh(weight: torch.Tensor, r: int) -> MinorComponents:
    """Fast path: float64 Gram matrix + ``eigh``. ``weight`` is (out × in) or a batch (b × out × in).

    Implements, for out ≥ in: ``V_r`` = eigenvectors of the r smallest eigenvalues of ``WᵀW``;
    ``U_r Σ_r = W V_r``; σ = column norms of ``W V_r``. For out < in the roles swap via ``WWᵀ``.
    """
    check_truncation_rank(r, weight.shape)
    w64 = weight.detach().to(torch.float64)
    out_features, in_features = w64.shape[-2], w64.shape[-1]
    if out_features >= in_features:
        gram = w64.mT @ w64  # (…, in, in)
        _, eigenvectors = torch.linalg.eigh(gram)  # ascending eigenvalues
        minor_v = eigenvectors[..., :, :r].flip(-1)  # (…, in, r), largest dropped σ first
        u_sigma = w64 @ minor_v  # (…, out, r) = U_r Σ_r
        # Column norms of W V_r are the σ themselves, computed without the ε·σ_max² error of sqrt(eigenvalue).
        sigma = torch.linalg.vector_norm(u_sigma, dim=-2)
        return MinorComponents(minor_u_sigma=u_sigma, minor_vh=minor_v.mT, singular_values=sigma)
    gram = w64 @ w64.mT  # (…, out, out)
    _, eigenvectors = torch.linalg.eigh(gram)
    minor_u = eigenvectors[..., :, :r].flip(-1)  # (…, out, r)
    sigma_vh = minor_u.mT @ w64  # (…, r, in) = Σ_r V_rᵀ
    sigma = torch.linalg.vector_norm(sigma_vh, dim=-1)
    # Normalise rows to V_rᵀ; an exactly-zero σ leaves a zero row, which keeps the product exact.
    safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    return MinorComponents(
        minor_u_sigma=minor_u * sigma[..., None, :],
        minor_vh=sigma_vh / safe_sigma[..., :, None],
        singular_values=sigma,
    )


def truncate_minor_components(
    weight: torch.Tensor, r: int, method: TruncationMethod = "gram_eigh"
) -> MinorComponents:
    """Find the r smallest singular triplets of ``weight`` (out × in) with the chosen path, in float64."""
    if not torch.isfinite(weight).all():
        raise ValueError("KaSA truncation needs finite weights, but the weight contains NaN or Inf.")
    if method == "gram_eigh":
        return minor_components_gram_eigh(weight, r)
    if method == "svd":
        return minor_components_svd(weight, r)
    raise ValueError(f"Unknown truncation method {method!r}; choose one of {TRUNCATION_METHODS}.")


def truncate_many(
    weights: Sequence[torch.Tensor],
    r: int,
    method: TruncationMethod = "gram_eigh",
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
) -> list[MinorComponents]:
    """Truncate several weights, batching same-shaped, same-device ones into one float64 ``eigh`` call.

    Returns one ``MinorComponents`` per input weight, in input order. Batching only changes speed, not results
    beyond float64 round-off. ``max_batch_bytes`` bounds the stacked float64 weights of one call.
    """
    results: list[MinorComponents | None] = [None] * len(weights)
    groups: dict[tuple, list[int]] = {}
    for index, weight in enumerate(weights):
        groups.setdefault((tuple(weight.shape), weight.device), []).append(index)
    for (shape, _device), indices in groups.items():
        per_matrix_bytes = 8 * (shape[0] * shape[1] + min(shape) ** 2)
        chunk = max(1, max_batch_bytes // per_matrix_bytes) if method == "gram_eigh" else 1
        for start in range(0, len(indices), chunk):
            chunk_indices = indices[start : start + chunk]
            stacked = torch.stack([weights[i].detach() for i in chunk_indices])
            minor = truncate_minor_components(stacked, r, method)
            for offset, i in enumerate(chunk_indices):
                results[i] = MinorComponents(
                    minor.minor_u_sigma[offset], minor.minor_vh[offset], minor.singular_values[offset]
                )
    return results  # type: ignore[return-value]


def principal_angle_cosine(basis_a: torch.Tensor, basis_b: torch.Tensor) -> float:
    """Smallest principal-angle cosine between the column spans of two (n × r) matrices (1.0 = same subspace)."""
    qa, _ = torch.linalg.qr(basis_a.to(torch.float64))
    qb, _ = torch.linalg.qr(basis_b.to(torch.float64))
    return float(torch.linalg.svdvals(qa.mT @ qb).min())
