"""Adapter files on disk: atomic writes, safetensors only (never pickle), base-weight fingerprints."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save

WEIGHTS_NAME = "kasa_adapter.safetensors"
FORMAT_VERSION = "1"
_FINGERPRINT_KEY = "kasa_peft.base_fingerprint"
_FINGERPRINT_SIZE = 16


class AdapterFileError(ValueError):
    """An adapter file that exists but cannot be used: truncated, corrupt, invalid JSON, or non-finite tensors.

    The message always names the file (and the tensor or key, where there is one)."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    contiguous = {key: tensor.detach().contiguous().cpu() for key, tensor in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata=metadata))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file and its metadata (safetensors cannot execute code, unlike pickle).

    Raises ``FileNotFoundError`` if ``path`` is missing and :class:`AdapterFileError` if it is truncated or corrupt
    or holds a NaN/Inf: a non-finite adapter would only show up later as NaN outputs.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Adapter weights not found: {path}. Expected a directory written by save_pretrained.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupt. "
            "Save the adapter again."
        ) from None
    check_finite(tensors, path)
    return tensors, metadata


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise :class:`AdapterFileError` naming the first floating-point tensor that holds a NaN or an Inf."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterFileError(
                f"{source}: tensor {key!r} holds NaN/Inf values; refusing to load it (the training run that wrote it "
                "probably diverged)."
            )


def read_json_object(path: str | Path) -> dict:
    """The JSON object in ``path``; :class:`AdapterFileError` naming the file if it is not valid JSON or no object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFileError(f"{path} is not valid JSON ({error}). Save the adapter again.") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, but holds a {type(data).__name__}.")
    return data


def weight_fingerprint(weight_out_in: torch.Tensor) -> torch.Tensor:
    """A cheap signature of a base weight: ``(W p)[:16]`` for a fixed pseudo-random probe ``p`` (float64).

    It changes with any substantive change of W (another checkpoint, another seed) but only by round-off between
    dtypes of the same weights, so a loader can tell "wrong base model" from "same model, different precision".
    """
    generator = torch.Generator().manual_seed(0x4B615341)  # "KaSA"
    in_features = weight_out_in.shape[1]
    probe = torch.randn(in_features, generator=generator, dtype=torch.float64).to(weight_out_in.device)
    rows = weight_out_in[:_FINGERPRINT_SIZE].detach().to(torch.float64)
    return (rows @ probe).cpu()


def encode_fingerprints(fingerprints: dict[str, torch.Tensor]) -> dict[str, str]:
    return {_FINGERPRINT_KEY: json.dumps({name: fp.tolist() for name, fp in fingerprints.items()})}


def decode_fingerprints(metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    raw = metadata.get(_FINGERPRINT_KEY)
    if not raw:
        return {}
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in json.loads(raw).items()}


def fingerprints_match(saved: torch.Tensor, current: torch.Tensor, rtol: float = 2e-2) -> bool:
    """Same base up to dtype round-off? (bf16 storage moves the probe by ≪ 1 %; another model moves it by ~100 %.)"""
    if saved.shape != current.shape:
        return False
    scale = float(saved.norm()) + 1e-12
    return float((saved - current).norm()) <= rtol * scale
