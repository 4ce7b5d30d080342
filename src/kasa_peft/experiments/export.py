"""``kasa export``: turn a trained KaSA adapter into a PEFT checkpoint that any LoRA server can load.

``--format lora`` (default) writes the exact rank-2r plain LoRA of :func:`kasa_peft.export_peft_checkpoint`:
``A' = [A; V_rᵀ]`` (2r × in), ``B' = [(α/r)·B·diag(σ), −U_rΣ_r]`` (out × 2r), scaling 1. On the *untouched* base it
computes ``W x − W_minor x + ΔW x``, i.e. the KaSA model, with no KaSA code at serve time. The cost is that of a
rank-2r LoRA: twice the adapter FLOPs and memory of a rank-r LoRA (still ≪ the base layer for r ≪ d).
``--format kasa`` writes PEFT's own KaSA variant (rank r; PEFT truncates the base destructively when it loads).
"""

from __future__ import annotations

import json
from pathlib import Path

from kasa_peft import KasaModel, export_peft_checkpoint
from kasa_peft.config import CONFIG_NAME

from .models import load_model

EXPORT_FORMATS = ("lora", "kasa")


def _locate(source: Path) -> tuple[Path, dict | None]:
    """(adapter directory, run config record or None) for a run directory or an adapter directory."""
    if (source / CONFIG_NAME).is_file():
        run_config = source.parent / "config.json"
        return source, (json.loads(run_config.read_text()) if run_config.is_file() else None)
    if (source / "adapter" / CONFIG_NAME).is_file() and (source / "config.json").is_file():
        return source / "adapter", json.loads((source / "config.json").read_text())
    raise FileNotFoundError(
        f"{source} is neither a KaSA adapter directory (with {CONFIG_NAME}) nor a `kasa train` run directory "
        "(with config.json and adapter/). Pass one of those."
    )


def export_adapter(source: str | Path, output_dir: str | Path, format: str = "lora", model: str | None = None,
                   overwrite: bool = False) -> Path:
    """Load the adapter at ``source`` onto its base model and write a PEFT checkpoint to ``output_dir``.

    The base comes from ``model`` or, for a run directory, the run's config.json (quantised the same way as in
    training, so the base-weight fingerprint check passes). Returns ``output_dir``, which must be new or empty, or
    (with ``overwrite``) an earlier export (:func:`~kasa_peft.experiments.rundir.write_output_folder`).
    """
    from .rundir import check_output_folder, write_output_folder

    check_output_folder(output_dir, "PEFT export", overwrite)
    if format not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {EXPORT_FORMATS}, got {format!r}.")
    adapter_dir, run = _locate(Path(source))
    if run is not None and run.get("method") != "kasa":
        raise ValueError(f"{source} is a {run.get('method')!r} run; only KaSA adapters (method 'kasa') export.")
    model_name = model or (run or {}).get("model")
    if model_name is None:
        raise ValueError(f"Pass --model: {adapter_dir} is not inside a run directory that records its base model.")
    kind = "classification" if (run or {}).get("task") in ("cola", "sst2", "mrpc", "stsb", "rte", "qnli") else "causal"
    num_labels = 1 if (run or {}).get("task") == "stsb" else 2
    loaded = load_model(model_name, kind, num_labels=num_labels, quantize=(run or {}).get("quantize"))
    kasa_model = KasaModel.from_pretrained(loaded.model, adapter_dir)
    return write_output_folder(output_dir, lambda folder: export_peft_checkpoint(kasa_model, folder, format=format),
                               kind="PEFT export", overwrite=overwrite)
