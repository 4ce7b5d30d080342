"""Plot of a truncation report (``truncation_report.json``, written by ``kasa inspect --json``) per layer.

Panels, one line per module kind (``q_proj``, ``v_proj``, …) against the layer index: the relative output change
‖W_minor X‖/‖W X‖ on the calibration data (with the guard threshold), the dropped weight energy ‖W_minor‖²/‖W‖², and
— when measured — the loss change with only that module truncated. Like ``report.py``, figures live on their own Agg
canvas (no pyplot global state).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from kasa_peft.checkpoint import atomic_write_bytes


def _layer_and_kind(name: str, position: int) -> tuple[int, str]:
    """('model.layers.12.self_attn.v_proj', _) → (12, 'v_proj'); modules without a number keep their position."""
    numbers = re.findall(r"\.(\d+)\.", f".{name}.")
    return (int(numbers[0]) if numbers else position), name.rsplit(".", 1)[-1]


def _series(modules: list[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for position, module in enumerate(modules):
        value = module.get(key)
        if not isinstance(value, (int, float)) or not module.get("truncated", True):
            continue
        layer, kind = _layer_and_kind(module["name"], position)
        xs, ys = series.setdefault(kind, ([], []))
        xs.append(layer)
        ys.append(float(value))
    return series


def plot_truncation_report(report: dict[str, Any], out_path: str | Path, title: str | None = None) -> Path | None:
    """Write the per-layer plot of ``report`` (a ``TruncationReport.to_dict()``); ``None`` if it has no modules."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modules = report.get("modules") or []
    if not modules:
        return None
    panels = [("output_change", "output change ‖W_minor X‖/‖W X‖", False),
              ("dropped_energy", "dropped weight energy", True)]
    if any(isinstance(m.get("loss_change_alone"), (int, float)) for m in modules):
        panels.append(("loss_change_alone", "Δ loss, only this module truncated", False))
    fig = Figure(figsize=(8, 2.6 * len(panels) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, label, percent) in zip(axes, panels):
        for kind, (xs, ys) in sorted(_series(modules, key).items()):
            ax.plot(xs, [100 * y for y in ys] if percent else ys, marker="o", markersize=3, label=kind)
        if key == "output_change" and isinstance(report.get("max_output_change"), (int, float)):
            ax.axhline(report["max_output_change"], color="C3", linestyle="--", linewidth=1, label="guard threshold")
        if key == "loss_change_alone":
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_ylabel(label + (" (%)" if percent else ""), fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("layer")
    loss = ""
    if isinstance(report.get("loss_original"), (int, float)) and isinstance(report.get("loss_truncated"), (int, float)):
        loss = f" — calibration loss {report['loss_original']:.3f} → {report['loss_truncated']:.3f}"
    axes[0].set_title((title or f"KaSA truncation before training ({report.get('basis', 'weight')} basis)") + loss, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(out_path, buffer.getvalue())
    return Path(out_path)


def plot_truncation_report_file(path: str | Path, out_path: str | Path) -> Path | None:
    """Plot a ``truncation_report.json``; ``None`` (nothing written) if the file is unreadable or not a report."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("modules"), list):
        return None
    return plot_truncation_report(data, out_path)
