"""Activation-aware choice of the dropped components — a research variant, NOT the method of the KaSA paper.

KaSA (arXiv 2412.06071) drops the r smallest singular triplets of the weight ``W`` (out × in) itself. A small σ
does not mean a small effect: if the inputs ``x`` that reach the layer have large components along a minor right
singular vector, dropping it changes the output a lot. Activation-aware SVD methods (ASVD, SVD-LLM) therefore
rank components by their effect on calibration activations. With the input second moment

    C = (1/n) Σ_t x_t x_tᵀ                         (in × in, from n calibration tokens)
    C_δ = C + δ · (tr C / in) · I                  (damping: directions no token visits fall back to the weight basis)

the variant takes the thin SVD ``W C_δ^{1/2} = U' Σ' V'ᵀ`` (k = min(out, in) triplets), keeps its r smallest
triplets and drops the part of ``W`` they carry::

    W_minor = U'_r U'_rᵀ W                         (rank r; an orthogonal projection of W's outputs)
            = W C_δ^{1/2} V'_r V'_rᵀ C_δ^{-1/2}     (the same matrix, written from the right side)

so that ``‖W_minor C_δ^{1/2}‖_F² = Σ σ'_r²`` is the smallest activation-weighted energy any rank-r output
projection can remove. With ``C ∝ I`` this is exactly KaSA's weight-basis ``U_r Σ_r V_rᵀ``.

Everything here is float64 and pure (tensors in, tensors out); results come in the canonical form of
:class:`~kasa_peft.spectral.MinorComponents` (``W_minor``'s own SVD factors), so a KaSA layer uses them unchanged.
"""

from __future__ import annotations

import torch

from .spectral import MinorComponents, check_truncation_rank

DEFAULT_ACTIVATION_DAMPING = 0.01


def damped_second_moment(second_moment: torch.Tensor, damping: float = DEFAULT_ACTIVATION_DAMPING) -> torch.Tensor:
    """``C_δ = C + δ·(tr C / in)·I`` in float64; ``second_moment`` is C (in × in, symmetric PSD).

    ``δ > 0`` makes ``C_δ`` positive definite even when fewer calibration tokens than input features were seen.
    """
    if not damping > 0:
        raise ValueError(f"activation damping must be > 0, got {damping!r}.")
    c64 = second_moment.detach().to(torch.float64)
    c64 = (c64 + c64.mT) / 2  # accumulated sums are symmetric only up to round-off
    in_features = c64.shape[-1]
    mean_eigenvalue = torch.diagonal(c64, dim1=-2, dim2=-1).sum(-1) / in_features
    if not float(mean_eigenvalue) > 0:
        raise ValueError("The calibration second moment is zero: every calibration input to this layer was zero.")
    return c64 + damping * mean_eigenvalue * torch.eye(in_features, dtype=torch.float64, device=c64.device)


def canonical_minor_components(left: torch.Tensor, right: torch.Tensor) -> MinorComponents:
    """Canonical SVD factors of a rank-r product ``M = left @ right`` (out × r times r × in), float64.

    ``left = Q₁R₁``, ``rightᵀ = Q₂R₂`` (QR), ``R₁R₂ᵀ = P S Qᵀ`` (r × r SVD) ⇒ ``M = (Q₁ P S)(Q₂ Q)ᵀ``: returns
    ``minor_u_sigma = Q₁ P S`` (out × r), ``minor_vh = (Q₂ Q)ᵀ`` (r × in, orthonormal rows), σ = S descending.
    """
    q_left, r_left = torch.linalg.qr(left.to(torch.float64))
    q_right, r_right = torch.linalg.qr(right.to(torch.float64).mT)
    p, s, qh = torch.linalg.svd(r_left @ r_right.mT)
    return MinorComponents(minor_u_sigma=(q_left @ p) * s, minor_vh=qh @ q_right.mT, singular_values=s)


def activation_minor_components(
    weight: torch.Tensor, second_moment: torch.Tensor, r: int, damping: float = DEFAULT_ACTIVATION_DAMPING
) -> MinorComponents:
    """``W_minor`` of the activation basis (module docstring) for ``weight`` (out × in) and input moment C (in × in).

    Fast path, one float64 ``eigh`` on the smaller side:

    - out ≤ in: ``W C_δ Wᵀ = U' Σ'² U'ᵀ`` (out × out); ``U'_r`` = eigenvectors of the r smallest eigenvalues;
      ``W_minor = U'_r (U'_rᵀ W)``.
    - out > in: ``C_δ^{1/2} WᵀW C_δ^{1/2} = V' Σ'² V'ᵀ`` (in × in); ``W_minor = (W C_δ^{1/2} V'_r)(V'_rᵀ C_δ^{-1/2})``
      (no division by a possibly tiny σ'; ``C_δ^{-1/2}`` exists because δ > 0).

    ``singular_values`` of the result are those of ``W_minor`` itself (not σ'), so energy fractions compare
    directly with the weight basis.
    """
    check_truncation_rank(r, weight.shape)
    w64 = weight.detach().to(torch.float64)
    out_features, in_features = w64.shape
    if tuple(second_moment.shape) != (in_features, in_features):
        raise ValueError(
            f"second moment has shape {tuple(second_moment.shape)}, expected ({in_features}, {in_features}) for a "
            f"weight of shape ({out_features}, {in_features})."
        )
    c_damped = damped_second_moment(second_moment.to(w64.device), damping)
    if out_features <= in_features:
        output_moment = w64 @ c_damped @ w64.mT
        _, eigenvectors = torch.linalg.eigh((output_moment + output_moment.mT) / 2)  # ascending
        minor_u = eigenvectors[:, :r]
        return canonical_minor_components(minor_u, minor_u.mT @ w64)
    eigenvalues, eigenvectors = torch.linalg.eigh(c_damped)
    root = (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.mT
    inverse_root = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.mT
    weighted = w64 @ root  # W C_δ^{1/2}, out × in
    gram = weighted.mT @ weighted
    _, right_vectors = torch.linalg.eigh((gram + gram.mT) / 2)
    minor_v = right_vectors[:, :r]
    return canonical_minor_components(weighted @ minor_v, minor_v.mT @ inverse_root)
