"""``kasa report``: markdown tables (best and final epoch) and plots from run directories.

Statistics per (task, method) over seeds: the median (the paper's statistic, 5 seeds there), mean ± sample std, the
step-0 value (evaluated before the first optimiser step), and the per-seed paired difference against LoRA on the
primary metric (same seed, same data: mean ± std of the differences and how many seeds KaSA-or-other is ahead).
Every row states its budget (preset and caps: training subset, epochs against the preset's, step limit).

A run directory holds ``config.json``, ``metrics.jsonl``, ``result.json`` (``status: complete`` once finished) and
optionally ``analysis.json`` (spectrum of a targeted weight, learned σ per layer). Unfinished runs are listed as
such and never enter the numbers, the curves or the plots.

Plots use matplotlib's object API on an Agg canvas created inside each function: importing this module does not
import matplotlib, and plotting never touches pyplot's global state (backend, current figure).
"""

from __future__ import annotations

import io
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from kasa_peft.checkpoint import atomic_write_bytes, atomic_write_text

METHOD_ORDER = ("kasa", "peft-kasa", "lora", "pissa", "milora", "dora", "full")
#: Metrics in [0, 1] shown ×100 (also with a prefix: ``boolq_accuracy``, ``ref_ROUGE_L``). Anything else (NIST,
#: CIDEr, losses, counts, judge scores) is shown as recorded.
SCALED_METRICS = (
    "accuracy", "matthews_correlation", "mcc", "f1", "pearson", "spearmanr", "combined", "precision", "recall",
    "exact_match", "BLEU", "METEOR", "ROUGE_L",
)
#: Metrics never shown as columns of the tables.
HIDDEN_METRICS = {"epoch", "loss"}


# ----------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One run directory. ``result`` is ``None`` when ``result.json`` is missing or unreadable."""

    path: Path
    config: dict
    result: dict | None

    @property
    def complete(self) -> bool:
        return isinstance(self.result, dict) and self.result.get("status") == "complete"

    @property
    def reason(self) -> str:
        """Why the run is not complete ("" when it is)."""
        if self.complete:
            return ""
        if self.result is None:
            return "no readable result.json" if (self.path / "result.json").exists() else "no result.json"
        return f"status: {self.result.get('status', 'missing')}"

    def _field(self, key: str) -> Any:
        source = self.result if self.complete else self.config
        return source.get(key, self.config.get(key))

    @property
    def task(self) -> str:
        return str(self._field("task") or "?")

    @property
    def method(self) -> str:
        return str(self._field("method") or "?")

    @property
    def seed(self) -> Any:
        return self._field("seed")

    def read_jsonl(self, name: str) -> list[dict]:
        """Records of a JSON-lines file; lines that are not JSON objects (a torn last line) are skipped."""
        path = self.path / name
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def analysis(self) -> dict:
        data = _read_json(self.path / "analysis.json")
        return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _run_config(path: Path) -> dict | None:
    """The config of a run directory, or ``None`` when ``path`` is not one (a model's config.json has no method)."""
    config = _read_json(path / "config.json")
    if (path / "config.json").is_file() and config is None:
        return {}  # unreadable: still a run directory, listed as unfinished
    return config if isinstance(config, dict) and "method" in config else None


def find_runs(paths: list[Path], max_depth: int = 3) -> list[Run]:
    """Run directories at or below ``paths`` (a run directory has a config.json naming a ``method``).

    Each path may be a run directory or a directory holding run directories up to ``max_depth`` levels down.
    Checkpoint folders are not searched; a run found twice is returned once.
    """
    runs: dict[Path, Run] = {}

    def visit(path: Path, depth: int) -> None:
        config = _run_config(path)
        if config is not None:
            result = _read_json(path / "result.json")
            runs.setdefault(path.resolve(), Run(path, config, result if isinstance(result, dict) else None))
            return
        if depth < max_depth:
            for child in sorted(p for p in path.iterdir() if p.is_dir() and p.name not in ("checkpoints", "adapter")):
                visit(child, depth + 1)

    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"No such run directory: {path}")
        visit(path, 0)
    return list(runs.values())


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _seed_key(run: Run) -> tuple:
    return (0, run.seed, "") if _is_number(run.seed) else (1, 0, str(run.seed))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: The baseline of the paired differences.
REFERENCE_METHOD = "lora"


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def _metric_columns(records: Iterable[dict | None]) -> dict[str, dict[str, float]]:
    columns: dict[str, list[float]] = {}
    for record in records:
        for key, value in (record or {}).items():
            if _is_number(value) and math.isfinite(value):
                columns.setdefault(key, []).append(float(value))
    return {key: _stats(values) for key, values in sorted(columns.items())}


def _primary_by_seed(members: list[Run], which: str, primary: str) -> dict[Any, float]:
    values = {}
    for run in members:
        value = (run.result.get(which) or {}).get(primary)
        if _is_number(value) and math.isfinite(value):
            values[run.seed] = float(value)
    return values


def paired_differences(method_values: dict[Any, float], reference_values: dict[Any, float]) -> dict[str, Any] | None:
    """Per-seed ``method − reference`` on the seeds both have: the differences, mean ± sample std, wins/ties."""
    seeds = [seed for seed in method_values if seed in reference_values]
    if not seeds:
        return None
    diffs = [method_values[seed] - reference_values[seed] for seed in seeds]
    return {"seeds": seeds, "diffs": diffs, **_stats(diffs),
            "ahead": sum(d > 0 for d in diffs), "level": sum(d == 0 for d in diffs)}


def summarize(runs: list[Run]) -> list[dict]:
    """One entry per (task, method) of the complete runs, ordered by task then :data:`METHOD_ORDER`.

    Each entry: ``task, method, n, seeds, models, primary_metric, trainable_params, budget`` and, for ``step0``,
    ``best`` and ``final``, ``{metric: {"median", "mean", "std", "n"}}`` with the sample standard deviation (n − 1;
    0.0 for one value); ``paired`` holds, for ``best`` and ``final``, the per-seed difference to
    :data:`REFERENCE_METHOD` on the primary metric (:func:`paired_differences`; ``None`` without common seeds).
    Values that are not finite numbers are left out, so a metric's ``n`` can be below the entry's.
    """
    from .presets import budget_text

    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.complete:
            groups.setdefault((run.task, run.method), []).append(run)
    summary = []
    for (task, method), members in sorted(groups.items(), key=lambda item: (item[0][0], _method_rank(item[0][1]))):
        members.sort(key=_seed_key)
        params = [r.result.get("trainable_params") for r in members if _is_number(r.result.get("trainable_params"))]
        entry: dict[str, Any] = {
            "task": task, "method": method, "n": len(members), "seeds": [r.seed for r in members],
            "models": sorted({str(r.result.get("model", r.config.get("model"))) for r in members}),
            "primary_metric": members[0].result.get("primary_metric", "accuracy"),
            "trainable_params": params[0] if params else None,
            "budget": _distinct(budget_text(r.result.get("budget")) for r in members),
        }
        for which in ("step0", "best", "final"):
            entry[which] = _metric_columns(run.result.get(which) for run in members)
        summary.append(entry)
    for entry in summary:
        reference = groups.get((entry["task"], REFERENCE_METHOD))
        own = groups[(entry["task"], entry["method"])]
        entry["paired"] = {
            which: paired_differences(_primary_by_seed(own, which, entry["primary_metric"]),
                                      _primary_by_seed(reference, which, entry["primary_metric"]))
            if reference is not None and entry["method"] != REFERENCE_METHOD else None
            for which in ("best", "final")
        }
    return summary


# ----------------------------------------------------------------------------------------------- tables
def is_scaled(metric: str) -> bool:
    """Whether ``metric`` is a 0–1 score shown ×100."""
    return any(metric == name or metric.endswith("_" + name) for name in SCALED_METRICS)


def format_stat(metric: str, stat: dict | None, group_n: int | None = None) -> str:
    """``mean ± std`` (×100 for 0–1 metrics); the std only with two or more values; ``(n=k)`` if values are missing."""
    if not stat:
        return "–"
    scale = 100.0 if is_scaled(metric) else 1.0
    text = f"{stat['mean'] * scale:.2f}"
    if stat["n"] > 1:
        text += f" ± {stat['std'] * scale:.2f}"
    if group_n is not None and stat["n"] < group_n:
        text += f" (n={stat['n']})"
    return text


def format_median(metric: str, stat: dict | None) -> str:
    """The median over seeds (×100 for 0–1 metrics)."""
    if not stat:
        return "–"
    return f"{stat['median'] * (100.0 if is_scaled(metric) else 1.0):.2f}"


def format_paired(metric: str, paired: dict | None, method: str) -> str:
    """``+1.20 ± 0.40 (ahead 3/3)``: mean ± std of the per-seed differences to LoRA; ``ref`` on LoRA's own row."""
    if method == REFERENCE_METHOD:
        return "ref"
    if not paired:
        return "–"
    scale = 100.0 if is_scaled(metric) else 1.0
    text = f"{paired['mean'] * scale:+.2f}"
    if paired["n"] > 1:
        text += f" ± {paired['std'] * scale:.2f}"
    return text + f" (ahead {paired['ahead']}/{paired['n']})"


def _best_methods(summary: list[dict], which: str) -> set[tuple[str, str]]:
    """(task, method) pairs with the highest primary-metric median of their task; ties are all marked."""
    medians = {(e["task"], e["method"]): e[which][e["primary_metric"]]["median"]
               for e in summary if e["primary_metric"] in e[which]}
    top: dict[str, float] = {}
    for (task, _), median in medians.items():
        top[task] = max(top.get(task, median), median)
    return {key for key, median in medians.items() if median == top[key[0]]}


def _other_metrics(summary: list[dict], which: str) -> list[str]:
    primaries = {e["primary_metric"] for e in summary}
    return sorted({k for e in summary for k in e[which] if k not in HIDDEN_METRICS and k != e["primary_metric"]},
                  key=lambda k: (k in primaries, k.lower()))


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _params(value: Any) -> str:
    return f"{value:,}" if _is_number(value) else "–"


def _row_cells(entry: dict, which: str, others: list[str]) -> list[str]:
    primary = entry["primary_metric"]
    stat = entry[which].get(primary)
    return [
        entry["task"], entry["method"], str(entry["n"]), entry.get("budget", "–"),
        format_median(primary, entry.get("step0", {}).get(primary)),
        f"{primary} {format_median(primary, stat)}", format_stat(primary, stat, entry["n"]),
        format_paired(primary, (entry.get("paired") or {}).get(which), entry["method"]),
        *[format_stat(k, entry[which].get(k), entry["n"]) for k in others], _params(entry["trainable_params"]),
    ]


TABLE_COLUMNS = ("task", "method", "seeds", "budget", "step 0 (median)", "primary: median", "mean ± std",
                 f"Δ vs {REFERENCE_METHOD} (paired)")


def markdown_table(summary: list[dict], which: str = "best") -> str:
    """One row per (task, method): seeds, budget, step-0 median, primary median, mean ± std, paired Δ vs LoRA,
    the other metrics (mean ± std), trainable parameters.

    0–1 metrics are ×100, NIST/CIDEr/losses/counts as recorded; the best median per task (primary metric) is bold.
    """
    if which not in ("best", "final"):
        raise ValueError(f"which must be 'best' or 'final', not {which!r}")
    title = "best dev epoch" if which == "best" else "final evaluation"
    if not summary:
        return f"_No finished runs ({title})._"
    bold = _best_methods(summary, which)
    others = _other_metrics(summary, which)
    header = [*TABLE_COLUMNS, *[f"{k} (×100)" if is_scaled(k) else k for k in others], "trainable params"]
    lines = [
        f"**{title}**: median over seeds (the paper's statistic), mean ± sample std, and the per-seed paired "
        f"difference to {REFERENCE_METHOD} (mean ± std of the differences; seeds ahead). Step 0: before the first "
        "optimiser step (KaSA after its truncation). Metrics in [0, 1] (accuracy, MCC, F1, Pearson, BLEU, METEOR, "
        "ROUGE-L) are ×100; NIST and CIDEr are unscaled. Bold: best median of the task on its primary metric. "
        "Budget: preset and caps (≤N train = seeded training subset, a/b ep = epochs run of the preset's).",
        "",
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "---|" * len(header),
    ]
    for entry in summary:
        cells = _row_cells(entry, which, others)
        if (entry["task"], entry["method"]) in bold:
            cells[5] = f"**{cells[5]}**"
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def rich_table(summary: list[dict], which: str = "best"):
    """The :func:`markdown_table` rows as a ``rich.table.Table`` (best method per task in bold green)."""
    from rich.table import Table

    title = "best dev epoch" if which == "best" else "final evaluation"
    table = Table(title=f"{title} (median; mean ± std over seeds; paired Δ vs {REFERENCE_METHOD}; 0–1 metrics ×100)")
    others = _other_metrics(summary, which) if summary else []
    for column in (*TABLE_COLUMNS, *others, "trainable"):
        table.add_column(column, justify="left" if column in ("task", "method", "budget", "primary: median") else "right")
    bold = _best_methods(summary, which)
    for entry in summary:
        style = "bold green" if (entry["task"], entry["method"]) in bold else None
        table.add_row(*_row_cells(entry, which, others), style=style)
    return table


# ----------------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float, ncols: int = 1):
    """A figure on its own Agg canvas (no pyplot: no global backend switch, no figure registry to leak into)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", str(text)) or "_"


def _mean_curve(curves: list[dict[float, float]]) -> tuple[list[float], list[float]]:
    """Mean over seeds at the x values every seed has."""
    shared = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return shared, [statistics.fmean(c[x] for c in curves) for x in shared]


def plot_learning_curves(runs: list[Run], out_dir: Path) -> list[Path]:
    """Per task, ``curves_<task>.png``: training loss vs step and the primary dev metric vs epoch.

    One colour per method: thin lines per seed and, with several seeds, their mean as a thick line. Tasks evaluated
    only after training show the final value as a point. Incomplete runs are left out.
    """
    out_dir = Path(out_dir)
    complete = [r for r in runs if r.complete]
    paths = []
    for task in sorted({r.task for r in complete}):
        members = sorted((r for r in complete if r.task == task), key=lambda r: (_method_rank(r.method), _seed_key(r)))
        primary = members[0].result.get("primary_metric", "accuracy")
        key = f"eval_{primary}"
        fig, (loss_ax, metric_ax) = _figure(11, 4, ncols=2)
        by_method: dict[str, list[Run]] = {}
        for run in members:
            by_method.setdefault(run.method, []).append(run)
        once_only = False
        for index, (method, group) in enumerate(by_method.items()):
            colour = f"C{index % 10}"
            losses, scores, first_lines = [], [], []
            for run in group:
                records = run.read_jsonl("metrics.jsonl")
                train = {rec["step"]: rec["loss"] for rec in records
                         if rec.get("kind") == "train" and _is_number(rec.get("loss")) and _is_number(rec.get("step"))}
                evals = {rec["epoch"]: rec[key] for rec in records
                         if rec.get("kind") == "eval" and _is_number(rec.get(key)) and _is_number(rec.get("epoch"))}
                if not evals and _is_number((run.result.get("final") or {}).get(primary)):
                    epoch = (run.result.get("best") or {}).get("epoch")
                    evals = {float(epoch) if _is_number(epoch) else 0.0: run.result["final"][primary]}
                    once_only = True
                losses.append(train)
                scores.append(evals)
                thin = len(group) > 1
                (loss_line,) = loss_ax.plot(sorted(train), [train[s] for s in sorted(train)], color=colour,
                                            linewidth=0.8 if thin else 1.6, alpha=0.4 if thin else 0.9)
                (metric_line,) = metric_ax.plot(sorted(evals), [evals[e] for e in sorted(evals)], color=colour, marker="o",
                                                markersize=3 if thin else 5, linewidth=0.8 if thin else 1.6,
                                                alpha=0.4 if thin else 0.9)
                if not first_lines:
                    first_lines = [loss_line, metric_line]
            for ax, curves, marker, first in ((loss_ax, losses, None, first_lines[0]), (metric_ax, scores, "o", first_lines[1])):
                xs, ys = _mean_curve([c for c in curves if c]) if len(group) > 1 else ([], [])
                if xs:
                    ax.plot(xs, ys, color=colour, linewidth=2.2, marker=marker, label=f"{method} (mean of {len(group)} seeds)")
                elif any(curves):
                    first.set_label(method if len(group) == 1 else f"{method} ({len(group)} seeds)")
        loss_ax.set(title=f"{task}: training loss", xlabel="step", ylabel="loss")
        metric_ax.set(title=f"{task}: dev {primary}", xlabel="epoch", ylabel=primary)
        for ax in (loss_ax, metric_ax):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            if not ax.get_lines() or not any(len(line.get_xdata()) for line in ax.get_lines()):
                ax.text(0.5, 0.5, "no data logged", ha="center", va="center", transform=ax.transAxes)
        if once_only:
            metric_ax.text(0.02, 0.02, "evaluated once, after training", fontsize=8, transform=metric_ax.transAxes)
        paths.append(_save(fig, out_dir / f"curves_{_slug(task)}.png"))
    return paths


def plot_spectrum(run: Run, out_path: Path) -> Path | None:
    """Singular values (log scale) of the run's first targeted weight; the r smallest, which KaSA drops, in red.

    Returns ``None`` (and writes nothing) when the run has no recorded spectrum.
    """
    spectrum = run.analysis().get("spectrum")
    if not isinstance(spectrum, dict) or not spectrum.get("singular_values"):
        return None
    values = [float(v) for v in spectrum["singular_values"]]
    positive = [v for v in values if v > 0]
    floor = min(positive) / 10 if positive else 1e-12
    values = [max(v, floor) for v in values]  # exact zeros cannot be drawn on a log axis
    r = min(max(int(spectrum.get("r") or 0), 0), len(values))
    kept = len(values) - r
    fig, ax = _figure(7, 4)
    ax.semilogy(range(kept), values[:kept], color="C0", marker="." if kept <= 64 else None, label="kept")
    if r:
        ax.semilogy(range(kept, len(values)), values[kept:], color="C3", linewidth=2.5,
                    marker="o" if r <= 64 else None, markersize=3, label=f"dropped by KaSA (r={r})")
        ax.axvspan(kept - 0.5, len(values) - 0.5, color="C3", alpha=0.12)
        ax.annotate(f"dropped by KaSA (r={r})", xy=(kept + (r - 1) / 2, values[kept]),
                    xytext=(0.55, 0.85), textcoords="axes fraction", color="C3", ha="center",
                    arrowprops={"arrowstyle": "->", "color": "C3"})
    ax.set(title=f"singular values of {spectrum.get('module', '?')} ({run.method}, {run.task})",
           xlabel="index (descending)", ylabel="singular value")
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, Path(out_path))


def plot_sigma(run: Run, out_path: Path) -> Path | None:
    """Learned σ of a KaSA run as a heatmap (adapted layers × r components).

    Returns ``None`` (and writes nothing) when the run recorded no σ (every method but KaSA).
    """
    sigma = run.analysis().get("sigma")
    if not isinstance(sigma, dict) or not sigma:
        return None
    names = list(sigma)
    width = max(len(sigma[n]) for n in names)
    grid = [[float(v) for v in sigma[n]] + [math.nan] * (width - len(sigma[n])) for n in names]
    limit = max((abs(v) for row in grid for v in row if math.isfinite(v)), default=1.0) or 1.0
    fig, ax = _figure(max(5.0, 0.4 * width + 3), max(2.5, 0.25 * len(names) + 1.2))
    image = ax.imshow(grid, aspect="auto", cmap="coolwarm", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_yticks(range(len(names)), [n.removesuffix(".weight")[-45:] for n in names], fontsize=7)
    ax.set_xticks(range(width))
    ax.set(title=f"learned σ per layer ({run.task}, seed {run.seed})", xlabel="component (of r)")
    fig.colorbar(image, ax=ax, label="σ")
    return _save(fig, Path(out_path))


# ----------------------------------------------------------------------------------------------- report
def _distinct(values: Iterable[Any]) -> str:
    seen: list[str] = []
    for value in values:
        text = "–" if value is None else ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        if text not in seen:
            seen.append(text)
    return "; ".join(seen) if seen else "–"


def _learning_rate(config: dict) -> Any:
    if config.get("method") == "full" and config.get("full_learning_rate") is not None:
        return config["full_learning_rate"]
    return config.get("learning_rate")


def _settings_section(runs: list[Run]) -> str:
    """Per method, the distinct settings of its finished runs, so that differences across methods show."""
    complete = sorted((r for r in runs if r.complete), key=lambda r: _method_rank(r.method))
    if not complete:
        return "_No finished runs._"
    lines = ["| method | tasks | models | r | alpha | learning rate | targets | notes |", "|---|---|---|---|---|---|---|---|"]
    methods: dict[str, list[Run]] = {}
    for run in complete:
        methods.setdefault(run.method, []).append(run)
    for method, group in methods.items():
        configs = [r.config for r in group]
        full = method == "full"  # r, alpha and targets do not apply: every parameter trains
        cells = [
            method,
            _distinct(r.task for r in group),
            _distinct(r.result.get("model", r.config.get("model")) for r in group),
            "n/a" if full else _distinct(c.get("r") for c in configs),
            "n/a" if full else _distinct(c.get("lora_alpha") for c in configs),
            _distinct(_learning_rate(c) for c in configs),
            "all parameters" if full else _distinct(c.get("resolved_target_modules") or c.get("target_modules") for c in configs),
            _distinct(note for r in group for note in (r.result.get("notes") or [])),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _paired_section(summary: list[dict]) -> str:
    """Per (task, method): the seeds both it and LoRA have, and the per-seed differences of the primary metric."""
    rows = [e for e in summary if (e.get("paired") or {}).get("best")]
    if not rows:
        return f"_No method shares a seed with a finished {REFERENCE_METHOD} run._"
    lines = ["| task | method | metric | seeds | per-seed Δ (×100 if 0–1) | median Δ | ahead / level / behind |",
             "|---|---|---|---|---|---|---|"]
    for entry in rows:
        paired, metric = entry["paired"]["best"], entry["primary_metric"]
        scale = 100.0 if is_scaled(metric) else 1.0
        behind = paired["n"] - paired["ahead"] - paired["level"]
        lines.append(f"| {_cell(entry['task'])} | {_cell(entry['method'])} | {_cell(metric)} | "
                     f"{_cell(_distinct(paired['seeds']))} | {', '.join(f'{d * scale:+.2f}' for d in paired['diffs'])} | "
                     f"{paired['median'] * scale:+.2f} | {paired['ahead']} / {paired['level']} / {behind} |")
    return "\n".join(lines)


def _warnings(runs: list[Run]) -> list[str]:
    """Groups whose runs differ in more than the seed (they are averaged together all the same)."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.complete:
            groups.setdefault((run.task, run.method), []).append(run)
    notes = []
    for (task, method), group in sorted(groups.items()):
        seeds = [str(r.seed) for r in group]
        if len(set(seeds)) < len(seeds):
            notes.append(f"{task}/{method}: the same seed appears more than once ({', '.join(sorted(seeds))})")
        for label, getter in (("model", lambda r: r.result.get("model", r.config.get("model"))),
                              ("r", lambda r: r.config.get("r")), ("lora_alpha", lambda r: r.config.get("lora_alpha")),
                              ("learning rate", lambda r: _learning_rate(r.config)),
                              ("targets", lambda r: r.config.get("resolved_target_modules") or r.config.get("target_modules"))):
            values = _distinct(getter(r) for r in group)
            if "; " in values:
                notes.append(f"{task}/{method}: runs with different {label} ({values}) are averaged together")
    return notes


def _runs_section(runs: list[Run], summary: list[dict]) -> list[str]:
    complete = [r for r in runs if r.complete]
    incomplete = [r for r in runs if not r.complete]
    lines = [
        f"{len(runs)} run director{'y' if len(runs) == 1 else 'ies'}: {len(complete)} finished run(s); "
        f"{len(incomplete)} unfinished run(s) excluded from the numbers and plots.",
        "",
    ]
    if summary:
        lines += ["| task | method | finished runs | seeds |", "|---|---|---|---|"]
        lines += [f"| {_cell(e['task'])} | {_cell(e['method'])} | {e['n']} | {_cell(_distinct(e['seeds']))} |" for e in summary]
        lines.append("")
    if incomplete:
        lines += ["Unfinished (excluded):", ""]
        lines += [f"- `{r.path}`: {r.task}/{r.method}, seed {r.seed if r.seed is not None else '?'} ({r.reason})"
                  for r in sorted(incomplete, key=lambda r: str(r.path))]
        lines.append("")
    warnings = _warnings(runs)
    if warnings:
        lines += ["Check:", "", *[f"- {w}" for w in warnings], ""]
    return lines


def _analysis_plots(runs: list[Run], out_dir: Path) -> list[tuple[str, Path]]:
    """Spectrum and σ plots per task (from the lowest-seed KaSA run that has them); plain names with one task."""
    complete = sorted((r for r in runs if r.complete), key=lambda r: (_method_rank(r.method), _seed_key(r)))
    tasks = sorted({r.task for r in complete})
    images = []
    for task in tasks:
        suffix = "" if len(tasks) == 1 else f"_{_slug(task)}"
        members = [r for r in complete if r.task == task]
        for run in members:  # KaSA first (method order); any method records the spectrum of the pretrained weight
            path = plot_spectrum(run, out_dir / f"spectrum{suffix}.png")
            if path is not None:
                images.append((f"{task}: singular values of a targeted weight (from `{run.path.name}`)", path))
                break
        for run in (r for r in members if r.method == "kasa"):
            path = plot_sigma(run, out_dir / f"sigma{suffix}.png")
            if path is not None:
                images.append((f"{task}: learned σ of KaSA (from `{run.path.name}`)", path))
                break
        for run in (r for r in members if (r.path / "truncation_report.json").is_file()):  # written by kasa inspect
            from .truncation_plots import plot_truncation_report_file

            path = plot_truncation_report_file(run.path / "truncation_report.json", out_dir / f"truncation{suffix}.png")
            if path is not None:
                images.append((f"{task}: what KaSA's truncation does before training (from `{run.path.name}`)", path))
                break
    return images


def build_report(paths: list[Path], out_dir: Path) -> Path:
    """Write ``out_dir/report.md`` (runs, best and final tables, settings, plots) and its PNGs; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = find_runs([Path(p) for p in paths])
    if not runs:
        raise FileNotFoundError(f"No run directories (with a config.json) under {', '.join(map(str, paths))}")
    summary = summarize(runs)
    images = [(f"{path.stem.removeprefix('curves_')}: training loss and dev metric", path)
              for path in plot_learning_curves(runs, out_dir)]
    images += _analysis_plots(runs, out_dir)
    parts = [
        "# KaSA experiment report", "",
        "## Runs", "", *_runs_section(runs, summary),
        "## Best dev epoch", "", markdown_table(summary, "best"), "",
        "## Final evaluation", "", markdown_table(summary, "final"), "",
        "## Paired differences vs LoRA, per seed (best epoch, primary metric)", "", _paired_section(summary), "",
        "## Settings per method", "", _settings_section(runs), "",
        "## Plots", "",
    ]
    for caption, image in images:
        parts += [f"### {caption}", "", f"![{image.stem}]({image.relative_to(out_dir).as_posix()})", ""]
    if not images:
        parts.append("_No plots (no finished runs)._")
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(parts).rstrip() + "\n")
    return report
