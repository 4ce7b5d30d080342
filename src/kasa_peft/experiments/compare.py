"""``kasa compare``: several methods × seeds on one task with identical settings, then one table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kasa_peft.checkpoint import atomic_write_text

from .runconfig import build_config


def comparison_configs(config_file: Path | None, methods: list[str], seeds: list[int], output_dir: Path,
                       **overrides: Any) -> list:
    """One validated RunConfig per (method, seed), each in ``output_dir/<method>-s<seed>``."""
    if not methods or not seeds:
        raise ValueError("compare needs at least one method (--methods) and one seed (--seeds)")
    return [
        build_config(config_file, method=method, seed=seed, output_dir=str(Path(output_dir) / f"{method}-s{seed}"), **overrides)
        for method in methods
        for seed in seeds
    ]


def run_comparison(
    config_file: Path | None,
    methods: list[str],
    seeds: list[int],
    output_dir: Path,
    resume: bool = False,
    **overrides: Any,
):
    """Train every (method, seed) into ``output_dir/<method>-s<seed>``; returns a rich table of the results.

    Settings are shared across methods; the only built-in difference is the learning rate of ``full`` fine-tuning
    (``full_learning_rate``), which the report states. Finished runs are kept when ``resume`` is set.
    """
    from .report import build_report, find_runs, markdown_table, rich_table, summarize
    from .runner import run_experiment

    output_dir = Path(output_dir)
    configs = comparison_configs(config_file, methods, seeds, output_dir, **overrides)  # all validated before any run
    for config in configs:
        if resume and (config.run_dir / "result.json").is_file():
            continue
        run_experiment(config, resume=resume)
    runs = find_runs([config.run_dir for config in configs])
    summary = summarize(runs)
    atomic_write_text(output_dir / "compare.json", json.dumps(summary, indent=2, default=str))
    atomic_write_text(output_dir / "compare.md", markdown_table(summary, "best") + "\n\n" + markdown_table(summary, "final") + "\n")
    build_report([output_dir], output_dir / "report")
    return rich_table(summary, "best")
