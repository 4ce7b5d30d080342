"""KaSA's auxiliary losses (paper Eq. 9–11), computed batched over same-shaped layers.

Paper form (default), summed over adapted layers ℓ::

    L_reg = Σ_ℓ [ β·‖σ_ℓ‖² + γ·(‖A_ℓ A_ℓᵀ − I_r‖_F + ‖B_ℓᵀ B_ℓ − I_r‖_F) ]

Authors' training-script form (``form="authors"``), with outer Grams and a mean over the n adapted modules::

    L_reg = (1/n) Σ_ℓ [ β·‖σ_ℓ‖² + γ·(‖A_ℓᵀ A_ℓ − I_in‖_F + ‖B_ℓ B_ℓᵀ − I_out‖_F) ]

The outer Grams are never formed: ``AᵀA`` (in × in) has the r eigenvalues of ``AAᵀ`` and ``in − r`` zeros, so
``‖AᵀA − I_in‖_F² = ‖AAᵀ − I_r‖_F² + (in − r)`` exactly; likewise for B. That keeps the compatibility form as cheap as
the paper form (an r × r Gram per factor) and avoids the cancellation of expanding the norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _stack_by_shape(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tuple(tensor.shape), tensor.device, tensor.dtype), []).append(tensor)
    return [torch.stack(group) for group in groups.values()]


def _inner_gram_deviation_sq(stacked: torch.Tensor, rows_are_vectors: bool) -> torch.Tensor:
    """‖G − I_r‖_F² per matrix, G = MMᵀ (rows_are_vectors) or MᵀM, for a stack (n × … × …) in float32."""
    m = stacked.float()
    gram = m @ m.mT if rows_are_vectors else m.mT @ m
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return (gram - eye).square().sum(dim=(-2, -1))


def orthogonality_penalty(
    lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], form: str = "paper"
) -> torch.Tensor:
    """Σ_ℓ (‖A_ℓA_ℓᵀ − I‖_F + ‖B_ℓᵀB_ℓ − I‖_F); ``form="authors"`` uses the outer Grams (see module docstring).

    ``lora_a[ℓ]`` is (r × in), ``lora_b[ℓ]`` is (out × r). Returns a float32 scalar (not averaged).
    """
    _check_form(form)
    total = lora_a[0].new_zeros((), dtype=torch.float32) if lora_a else torch.zeros(())
    for stacked in _stack_by_shape(lora_a):
        dev_sq = _inner_gram_deviation_sq(stacked, rows_are_vectors=True)
        if form == "authors":
            dev_sq = dev_sq + (stacked.shape[-1] - stacked.shape[-2])  # + (in − r)
        total = total + _safe_sqrt(dev_sq).sum()
    for stacked in _stack_by_shape(lora_b):
        dev_sq = _inner_gram_deviation_sq(stacked, rows_are_vectors=False)
        if form == "authors":
            dev_sq = dev_sq + (stacked.shape[-2] - stacked.shape[-1])  # + (out − r)
        total = total + _safe_sqrt(dev_sq).sum()
    return total


def _check_form(form: str) -> None:
    if form not in ("paper", "authors"):
        raise ValueError(f"Unknown regularization form {form!r}; use 'paper' or 'authors'.")


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    # d√x/dx is infinite at 0 (perfectly orthonormal factors); take the subgradient 0 there, as matrix_norm does.
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def singular_value_penalty(sigmas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_ℓ ‖σ_ℓ‖² as a float32 scalar."""
    if not sigmas:
        return torch.zeros(())
    return sum(stacked.float().square().sum() for stacked in _stack_by_shape(sigmas))


def kasa_regularization(
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    sigmas: Sequence[torch.Tensor],
    beta: float,
    gamma: float,
    form: str = "paper",
) -> torch.Tensor:
    """β·Σσ² + γ·orthogonality over all given layers; ``form="authors"`` divides by the number of layers."""
    _check_form(form)
    if not lora_a:
        return torch.zeros(())
    loss = beta * singular_value_penalty(sigmas) + gamma * orthogonality_penalty(lora_a, lora_b, form)
    if form == "authors":
        loss = loss / len(lora_a)
    return loss
