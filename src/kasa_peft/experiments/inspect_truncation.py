"""``kasa inspect``: load a model, build a fresh KaSA adapter (nothing trained) and report what its truncation does.

Calibration text: ``--data FILE`` (``.txt``: paragraphs separated by blank lines, one sequence each; ``.jsonl``: one
``{"text": ...}`` per line), or the built-in English paragraph below. Causal LMs get ``labels = input_ids`` so the
report includes the language-model loss; classifiers get no labels (their head is untrained, a loss would mean
nothing) and the report gives the per-module figures only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kasa_peft import KasaConfig, get_kasa_model
from kasa_peft.checkpoint import atomic_write_text
from kasa_peft.truncation_report import TruncationReport

from .models import ModelResolutionError, describe, load_model

# Our own plain English paragraph (general knowledge, no markup): the default calibration input for causal LMs.
DEFAULT_CALIBRATION_TEXT = (
    "The river runs through the middle of the old town, and most of the houses along its banks were built more "
    "than two hundred years ago. In the summer, families walk along the water in the evening, children feed the "
    "ducks, and small boats carry visitors from the bridge to the market square. When the autumn rains come, the "
    "river rises quickly, so the town keeps a wall of sandbags ready near the church. Most people who grew up here "
    "say that the sound of the water is the first thing they miss when they move away."
)


def load_calibration_texts(path: str | Path | None) -> list[str]:
    """Texts from ``path`` (``.txt`` paragraphs or ``.jsonl`` ``text`` fields); the built-in paragraph for None."""
    if path is None:
        return [DEFAULT_CALIBRATION_TEXT]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file (pass a .txt file of paragraphs or a .jsonl with 'text').")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"--data {path}: line {number} is not JSON ({error.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"--data {path}: line {number} has no string field 'text'.")
            texts.append(record["text"])
    else:
        texts = [block.strip() for block in raw.split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"--data {path}: no text in the file.")
    return texts


def calibration_batches(tokenizer, texts: list[str], causal: bool, max_length: int = 512, batch_size: int = 8) -> list[dict]:
    """Tokenised batches; for causal LMs ``labels`` = ``input_ids`` with padding masked (-100)."""
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
        batch = dict(encoded)
        if causal:
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
        batches.append(batch)
    return batches


def _load(model_name: str):
    """A causal LM if the model is one, else a sequence classifier (2 labels; its head is random and unused)."""
    try:
        return load_model(model_name, "causal", num_labels=0), True
    except ModelResolutionError as error:
        if "encoder" not in str(error) and "classification" not in str(error):
            raise
    return load_model(model_name, "classification", num_labels=2), False


def inspect_truncation(
    model: str,
    targets: list[str] | str,
    r: int = 8,
    data: str | Path | None = None,
    per_module_loss: bool = False,
    basis: str = "weight",
    max_output_change: float = 0.1,
    max_length: int = 512,
    basis_data: str | Path | None = None,
    activation_damping: float = 0.01,
) -> tuple[TruncationReport, dict[str, Any]]:
    """Returns the report and a description of what was measured (model, targets, r, data).

    ``basis_data``: texts the activation basis is fitted on (default: ``data`` itself; pass other texts to measure
    on held-out data).
    """
    texts = load_calibration_texts(data)
    loaded, causal = _load(model)
    batches = calibration_batches(loaded.tokenizer, texts, causal, max_length=max_length)
    fit_batches = None
    if basis == "activation":
        fit_batches = batches if basis_data is None else calibration_batches(
            loaded.tokenizer, load_calibration_texts(basis_data), causal, max_length=max_length)
    config = KasaConfig(r=r, target_modules=targets, truncation_guard="off", truncation_basis=basis,
                        truncation_guard_max_output_change=max_output_change, activation_damping=activation_damping)
    torch.manual_seed(0)
    kasa_model = get_kasa_model(loaded.model, config, calibration_batches=fit_batches)
    report = kasa_model.truncation_report(batches, per_module_loss=per_module_loss)
    meta = {
        "model": describe(loaded), "targets": targets, "r": r, "basis": basis, "causal_lm": causal,
        "data": str(data) if data is not None else "built-in English paragraph", "texts": len(texts),
    }
    if basis == "activation":
        meta.update(basis_data=str(basis_data) if basis_data is not None else meta["data"], activation_damping=activation_damping)
    return report, meta


def report_json(report: TruncationReport, meta: dict[str, Any]) -> str:
    return json.dumps({**report.to_dict(), "measured": meta}, indent=2)


def write_report(report: TruncationReport, meta: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        from kasa_peft.truncation_report import REPORT_FILE_NAME

        path = path / REPORT_FILE_NAME
    atomic_write_text(path, report_json(report, meta) + "\n")
    return path


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def rich_table(report: TruncationReport, title: str):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("module", overflow="fold", no_wrap=False, min_width=24)
    table.add_column("shape", justify="right")
    table.add_column("dropped energy", justify="right")
    table.add_column("σ_r/σ_max", justify="right")
    table.add_column("output change", justify="right")
    per_module = any(m.loss_change_alone is not None for m in report.modules)
    if per_module:
        table.add_column("Δloss alone", justify="right")
    for m in report.modules:
        row = [m.name, f"{m.shape[0]}×{m.shape[1]}", f"{m.dropped_energy:.2%}" if m.truncated else "kept",
               _fmt(m.sigma_ratio, ".3f"), _fmt(m.output_change, ".4f")]
        if per_module:
            row.append(_fmt(m.loss_change_alone, "+.3f"))
        table.add_row(*row, style="bold red" if m.flagged else None)
    return table


def summary_lines(report: TruncationReport) -> list[str]:
    lines = [f"{report.batches} calibration batch(es), {report.tokens} tokens; basis: {report.basis}"]
    if report.loss_original is not None:
        lines.append(f"loss: original {report.loss_original:.4f} → truncated {report.loss_truncated:.4f} "
                     f"({report.loss_change:+.4f})")
    flagged = report.flagged_modules()
    if report.max_output_change is not None:
        shown = ", ".join(flagged[:8]) + (f", … ({len(flagged) - 8} more)" if len(flagged) > 8 else "")
        lines.append(f"{len(flagged)} module(s) over output change {report.max_output_change} (bold red): {shown or 'none'}")
    lines += report.notes
    return lines
