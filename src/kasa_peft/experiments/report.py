"""``kasa report``: markdown tables (best and final epoch, mean ± std over seeds) and plots from run directories.

A run directory holds ``config.json``, ``metrics.jsonl``, ``result.json`` (``status: complete`` once finished) and
optionally ``analysis.json`` (spectrum of a targeted weight, learned σ per layer). Unfinished runs are listed as
such and never enter the numbers.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from kasa_peft.checkpoint import atomic_write_bytes, atomic_write_text

METHOD_ORDER = ("kasa", "peft-kasa", "lora", "pissa", "milora", "dora", "full")
UNSCALED_METRICS = {"NIST", "CIDEr", "loss", "answered", "with_reference", "judge_score", "judge_rated", "epoch"}


@dataclass
class Run:
    path: Path
    config: dict
    result: dict | None

    @property
    def complete(self) -> bool:
        return bool(self.result) and self.result.get("status") == "complete"

    def read_jsonl(self, name: str) -> list[dict]:
        path = self.path / name
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def analysis(self) -> dict:
        path = self.path / "analysis.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def _load_run(path: Path) -> Run:
    result_path = path / "result.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    return Run(path, json.loads((path / "config.json").read_text()), result)


def find_runs(paths: list[Path], max_depth: int = 3) -> list[Run]:
    """Run directories at or below ``paths`` (a run directory is one with a config.json)."""
    runs: dict[Path, Run] = {}

    def visit(path: Path, depth: int) -> None:
        if (path / "config.json").is_file() and "method" in json.loads((path / "config.json").read_text()):
            runs[path.resolve()] = _load_run(path)
            return
        if depth < max_depth and path.is_dir():
            for child in sorted(p for p in path.iterdir() if p.is_dir() and p.name != "checkpoints"):
                visit(child, depth + 1)

    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"No such run directory: {path}")
        visit(Path(path), 0)
    return list(runs.values())


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def summarize(runs: list[Run]) -> list[dict]:
    """One entry per (task, method): mean, sample std and n of every metric of the best and final evaluations."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.complete:
            groups.setdefault((run.result["task"], run.result["method"]), []).append(run)
    summary = []
    for (task, method), members in sorted(groups.items(), key=lambda item: (item[0][0], _method_rank(item[0][1]))):
        entry = {"task": task, "method": method, "n": len(members), "seeds": sorted(r.result["seed"] for r in members),
                 "primary_metric": members[0].result["primary_metric"],
                 "trainable_params": members[0].result.get("trainable_params")}
        for which in ("best", "final"):
            stats = {}
            keys = sorted({k for r in members for k, v in r.result[which].items() if isinstance(v, (int, float))})
            for key in keys:
                values = [float(r.result[which][key]) for r in members if key in r.result[which]]
                stats[key] = {"mean": statistics.fmean(values),
                              "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
            entry[which] = stats
        summary.append(entry)
    return summary


def _format(metric: str, stat: dict | None) -> str:
    if stat is None:
        return "–"
    scale = 1.0 if metric in UNSCALED_METRICS else 100.0
    text = f"{stat['mean'] * scale:.2f}"
    return text + (f" ± {stat['std'] * scale:.2f}" if stat["n"] > 1 else "")


def _best_methods(summary: list[dict], which: str) -> set[tuple[str, str]]:
    """(task, method) pairs with the highest primary-metric mean of their task; ties are all marked."""
    means = {(e["task"], e["method"]): e[which][e["primary_metric"]]["mean"] for e in summary if e["primary_metric"] in e[which]}
    top = {}
    for (task, _), mean in means.items():
        top[task] = max(top.get(task, mean), mean)
    return {key for key, mean in means.items() if mean == top[key[0]]}


def markdown_table(summary: list[dict], which: str = "best") -> str:
    """Rows (task, method); metrics ×100 except NIST/CIDEr/loss; the best method per task in bold."""
    if not summary:
        return f"_No finished runs ({which})._"
    bold = _best_methods(summary, which)
    others = sorted({k for e in summary for k in e[which] if k not in (e["primary_metric"], "epoch", "loss")})
    header = ["task", "method", "seeds", "primary (×100)", *others, "trainable params"]
    lines = [f"**{which} {'dev epoch' if which == 'best' else 'evaluation'}** — mean ± std over seeds; "
             "0–1 metrics ×100, NIST/CIDEr unscaled", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for entry in summary:
        primary = entry["primary_metric"]
        value = f"{primary} {_format(primary, entry[which].get(primary))}"
        if (entry["task"], entry["method"]) in bold:
            value = f"**{value}**"
        cells = [entry["task"], entry["method"], str(entry["n"]), value,
                 *[_format(k, entry[which].get(k)) for k in others], f"{entry['trainable_params'] or 0:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rich_table(summary: list[dict], which: str = "best"):
    from rich.table import Table

    table = Table(title=f"{which} (mean ± std over seeds, ×100 where 0–1)")
    for column in ("task", "method", "seeds", "primary", "trainable"):
        table.add_column(column, justify="right" if column in ("seeds", "trainable") else "left")
    bold = _best_methods(summary, which)
    for entry in summary:
        primary = entry["primary_metric"]
        value = f"{primary} {_format(primary, entry[which].get(primary))}"
        style = "bold green" if (entry["task"], entry["method"]) in bold else None
        table.add_row(entry["task"], entry["method"], str(entry["n"]), value, f"{entry['trainable_params'] or 0:,}", style=style)
    return table


# ----------------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_learning_curves(runs: list[Run], out_dir: Path) -> list[Path]:
    """Per task: training loss vs step and the primary dev metric vs epoch, one line per (method, seed)."""
    plt = _pyplot()
    paths = []
    tasks = sorted({r.result["task"] for r in runs if r.complete})
    for task in tasks:
        members = sorted((r for r in runs if r.complete and r.result["task"] == task),
                         key=lambda r: (_method_rank(r.result["method"]), r.result["seed"]))
        fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4))
        colours = {}
        for run in members:
            method = run.result["method"]
            colour = colours.setdefault(method, f"C{len(colours)}")
            label = method if method not in {l.get_label() for l in loss_ax.get_lines()} else None
            train = [rec for rec in run.read_jsonl("metrics.jsonl") if rec["kind"] == "train" and "loss" in rec]
            loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=colour, label=label, alpha=0.8)
            key = f"eval_{run.result['primary_metric']}"
            evals = [rec for rec in run.read_jsonl("metrics.jsonl") if rec["kind"] == "eval" and key in rec]
            if evals:
                metric_ax.plot([r["epoch"] for r in evals], [r[key] for r in evals], marker="o", color=colour, label=label)
        loss_ax.set(title=f"{task}: training loss", xlabel="step", ylabel="loss")
        metric_ax.set(title=f"{task}: dev {members[0].result['primary_metric']}", xlabel="epoch")
        loss_ax.legend()
        if metric_ax.get_lines():
            metric_ax.legend()
        else:
            metric_ax.text(0.5, 0.5, "evaluated once, after training", ha="center", transform=metric_ax.transAxes)
        paths.append(_save(fig, out_dir / f"curves_{task}.png"))
        plt.close(fig)
    return paths


def plot_spectrum(run: Run, out_path: Path) -> Path | None:
    """Singular values of the run's first targeted weight (log scale) with the r that KaSA drops marked."""
    spectrum = run.analysis().get("spectrum")
    if not spectrum:
        return None
    plt = _pyplot()
    values, r = spectrum["singular_values"], spectrum["r"]
    fig, ax = plt.subplots(figsize=(7, 4))
    kept = len(values) - r
    ax.semilogy(range(kept), values[:kept], color="C0", label="kept (world knowledge)")
    ax.semilogy(range(kept, len(values)), values[kept:], color="C3", linewidth=3, label=f"dropped by KaSA (r={r})")
    ax.axvspan(kept - 0.5, len(values) - 0.5, color="C3", alpha=0.12)
    ax.set(title=f"singular values of {spectrum['module']}", xlabel="index (descending)", ylabel="σ")
    ax.legend()
    _save(fig, out_path)
    plt.close(fig)
    return out_path


def plot_sigma(run: Run, out_path: Path) -> Path | None:
    """Learned σ per adapted layer (heatmap layers × r) of a KaSA run."""
    sigma = run.analysis().get("sigma")
    if not sigma:
        return None
    plt = _pyplot()
    names = list(sigma)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.25 * len(names) + 1)))
    image = ax.imshow([sigma[n] for n in names], aspect="auto", cmap="coolwarm")
    ax.set_yticks(range(len(names)), [n.replace(".weight", "")[-40:] for n in names], fontsize=7)
    ax.set(title="learned σ per layer", xlabel="component")
    fig.colorbar(image, ax=ax)
    _save(fig, out_path)
    plt.close(fig)
    return out_path


def _settings_section(runs: list[Run]) -> str:
    lines = ["| method | r | alpha | learning rate | targets | notes |", "|---|---|---|---|---|---|"]
    seen = set()
    for run in sorted((r for r in runs if r.complete), key=lambda r: _method_rank(r.result["method"])):
        c = run.config
        lr = c.get("full_learning_rate") if c.get("method") == "full" else c.get("learning_rate")
        row = (c.get("method"), c.get("r"), c.get("lora_alpha"), lr, str(c.get("resolved_target_modules") or c.get("target_modules")),
               "; ".join(run.result.get("notes", [])))
        if row not in seen:
            seen.add(row)
            lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines)


def build_report(paths: list[Path], out_dir: Path) -> Path:
    """Write ``out_dir/report.md`` and its PNG plots; returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = find_runs([Path(p) for p in paths])
    complete = [r for r in runs if r.complete]
    incomplete = [r for r in runs if not r.complete]
    summary = summarize(runs)
    images = plot_learning_curves(runs, out_dir)
    kasa_runs = [r for r in complete if r.result["method"] == "kasa"]
    spectrum_run = kasa_runs[0] if kasa_runs else (complete[0] if complete else None)
    if spectrum_run is not None:
        images.append(plot_spectrum(spectrum_run, out_dir / "spectrum.png"))
    if kasa_runs:
        images.append(plot_sigma(kasa_runs[0], out_dir / "sigma.png"))
    parts = [
        "# KaSA experiment report", "",
        f"{len(complete)} finished run(s); {len(incomplete)} unfinished run(s) excluded from the numbers"
        + (": " + ", ".join(str(r.path) for r in incomplete) if incomplete else "."), "",
        "## Best dev epoch", "", markdown_table(summary, "best"), "",
        "## Final evaluation", "", markdown_table(summary, "final"), "",
        "## Settings per method", "", _settings_section(runs), "",
        "## Plots", "",
        *[f"![{image.stem}]({image.name})" for image in images if image is not None],
    ]
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(parts) + "\n")
    return report
