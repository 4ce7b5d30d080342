"""Choosing each module's dropped part when a KaSA adapter is created: basis, hand-kept modules, and the guard.

Called once per new adapter from ``KasaModel`` (never on load: a saved adapter carries its dropped parts and its
``truncation_skipped_modules``). Steps:

1. the dropped part ``W_minor`` of every target: the paper's weight basis (``spectral.truncate_many``), or the
   activation basis (``activation_basis``; needs calibration batches, NOT the paper's method);
2. modules listed in ``config.truncation_skipped_modules`` are not truncated at all;
3. with calibration batches and ``truncation_guard`` ≠ ``"off"``, the truncation report is measured (one pass, see
   ``truncation_report``) and modules over ``truncation_guard_max_output_change`` (or, if set,
   ``truncation_guard_max_loss_increase``) are named in a warning (``"warn"``) or kept untruncated (``"skip"``);
   with ``"budget"``, the fewest modules in order of output change are kept untruncated such that the calibration
   loss stays within ``truncation_guard_loss_tolerance`` of the original (``truncation_budget``; at most
   2 + ⌈log₂ n⌉ calibration passes).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .activation_basis import activation_minor_components
from .config import KasaConfig
from .base_layers import check_weight_readable, dense_weight, truncate_layers
from .spectral import MinorComponents
from .truncation_budget import choose_modules_to_keep
from .truncation_report import (
    TruncationReport,
    signature_model,
    check_calibration_batches,
    collect_layer_statistics,
    measure_truncation,
)

logger = logging.getLogger(__name__)


class TruncationGuardWarning(UserWarning):
    """Some modules' truncation changes their calibration output (or the loss) more than the guard allows."""


@dataclass
class TruncationPlan:
    """Per target (in the order given): the dropped part, or ``None`` to keep the module whole."""

    minors: list[MinorComponents | None]
    config: KasaConfig  # the config to record: truncation_skipped_modules filled in by 'skip'
    report: TruncationReport | None


def _format_flagged(report: TruncationReport, limit: int = 12) -> str:
    parts = []
    for module in report.modules:
        if module.flagged:
            text = f"{module.name} (output change {module.output_change:.3f}, dropped energy {module.dropped_energy:.2%}"
            if module.loss_change_alone is not None:
                text += f", loss {module.loss_change_alone:+.3f} alone"
            parts.append(text + ")")
    more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


def plan_truncation(
    model: nn.Module,
    base_layers: Mapping[str, nn.Module],
    config: KasaConfig,
    calibration_batches: Iterable[Mapping[str, Any]] | None = None,
) -> TruncationPlan:
    """Dropped parts for a new adapter of ``config`` on ``base_layers`` (name → frozen Linear/Conv1D).

    ``model`` is called on the calibration batches (a KasaModel: with its adapters disabled, i.e. the original
    model). Raises ``ValueError`` (one line) when the config needs calibration data and none (or unusable data) is
    given, or when ``truncation_skipped_modules`` names a module that is not a target.
    """
    names = list(base_layers)
    kept_whole = set(config.truncation_skipped_modules or ())
    unknown = sorted(kept_whole - set(names))
    if unknown:
        raise ValueError(
            f"KasaConfig.truncation_skipped_modules names modules that are not targets: {unknown[:6]}; use full module "
            f"paths among the targets (e.g. {names[:2]})."
        )
    needs_data = config.truncation_basis == "activation" or config.truncation_guard in ("skip", "budget")
    batches = None
    if calibration_batches is not None:
        batches = check_calibration_batches(calibration_batches, signature_model(model))
    elif needs_data:
        what = ("truncation_basis='activation'" if config.truncation_basis == "activation"
                else f"truncation_guard={config.truncation_guard!r}")
        raise ValueError(
            f"KasaConfig {what} needs calibration data: pass calibration_batches=[tokenizer(text, "
            "return_tensors='pt'), ...] to get_kasa_model / add_adapter."
        )

    to_truncate = [name for name in names if name not in kept_whole]
    if config.truncation_basis == "activation":
        stats, _ = collect_layer_statistics(model, {n: base_layers[n] for n in to_truncate}, batches, second_moments=True)
        found = []
        for name in to_truncate:
            check_weight_readable(base_layers[name], name)
            moment = stats[name].second_moment
            if moment is None:
                raise ValueError(f"No calibration token reached module {name!r}; the activation basis cannot be computed.")
            # Dequantised / gathered where needed (kasa_peft.base_layers), one module at a time.
            with dense_weight(base_layers[name]) as weight:
                minor = activation_minor_components(weight, moment, config.r, config.activation_damping)
                found.append(minor.to(dtype=torch.float64, device=weight.device))
    else:
        # Batched per shape; quantised and ZeRO-3 weights are dequantised/gathered one at a time.
        found = truncate_layers({n: base_layers[n] for n in to_truncate}, config.r, config.truncation_method) if to_truncate else []
    by_name: dict[str, MinorComponents | None] = {name: None for name in names}
    by_name.update(zip(to_truncate, found))

    report = None
    if config.truncation_guard == "budget":
        report = measure_truncation(model, dict(base_layers), by_name, batches, basis=config.truncation_basis)
        decision = choose_modules_to_keep(
            model, dict(base_layers), by_name, batches, report, config.truncation_guard_loss_tolerance
        )
        kept = set(decision.kept_whole)
        for module in report.modules:
            module.flagged = module.name in kept
        report.notes.append(f"truncation_guard='budget': {decision.summary()}")
        if kept:
            warnings.warn(
                f"KaSA truncation guard (truncation_guard='budget'): {decision.summary()}: {_format_flagged(report)}.",
                TruncationGuardWarning,
                stacklevel=4,
            )
            for name in kept:
                by_name[name] = None
            config = dataclasses.replace(config, truncation_skipped_modules=sorted(kept_whole | kept))
        else:
            logger.info("KaSA truncation guard: %s", decision.summary())
    elif config.truncation_guard != "off" and batches is not None:
        report = measure_truncation(
            model, dict(base_layers), by_name, batches,
            per_module_loss=config.truncation_guard_max_loss_increase is not None,
            max_output_change=config.truncation_guard_max_output_change,
            max_loss_increase=config.truncation_guard_max_loss_increase,
            basis=config.truncation_basis,
        )
        flagged = report.flagged_modules()
        loss = ""
        if report.loss_change is not None:
            loss = f" (calibration loss {report.loss_original:.3f} → {report.loss_truncated:.3f} with every module truncated)"
        if flagged and config.truncation_guard == "warn":
            warnings.warn(
                f"KaSA truncation guard: {len(flagged)} of {len(names)} modules change by more than the threshold "
                f"(max output change {config.truncation_guard_max_output_change}) on the calibration data{loss}: "
                f"{_format_flagged(report)}. Truncating them anyway (truncation_guard='warn'); set "
                "truncation_guard='skip' to keep them whole, or 'off' to silence this.",
                TruncationGuardWarning,
                stacklevel=4,
            )
        elif flagged:
            warnings.warn(
                f"KaSA truncation guard: keeping {len(flagged)} of {len(names)} modules untruncated "
                f"(truncation_guard='skip'){loss}: {_format_flagged(report)}.",
                TruncationGuardWarning,
                stacklevel=4,
            )
            for name in flagged:
                by_name[name] = None
            config = dataclasses.replace(config, truncation_skipped_modules=sorted(kept_whole | set(flagged)))
        else:
            logger.info("KaSA truncation guard: no module over the threshold on %d calibration tokens", report.tokens)
    elif config.truncation_guard != "off":
        logger.info("KaSA truncation guard not run: no calibration_batches were passed.")
    return TruncationPlan(minors=[by_name[name] for name in names], config=config, report=report)
