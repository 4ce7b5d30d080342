"""The ``kasa`` command line: train, eval, compare, report, merge, score, demo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="KaSA experiments: train and compare KaSA against LoRA-family baselines, offline.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
score_app = typer.Typer(help="Score system outputs with the official metric definitions.", no_args_is_help=True)
app.add_typer(score_app, name="score")
console = Console(stderr=False)
err_console = Console(stderr=True)

# Errors that mean "the user's input is wrong": one clear line and a non-zero exit, never a traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, TypeError, KeyError)


def _fail(error: BaseException) -> None:
    err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _offline_defaults() -> None:
    # No hub is reachable on the project's machines; fail fast instead of retrying a download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _run_options(config_file, **flags):
    from .runconfig import build_config

    return build_config(config_file, **flags)


# Shared flags: typer needs them spelled out per command; these defaults (None) mean "take the config file's value".
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML/JSON file of run settings; flags override it.")


@app.command()
def train(
    config: Optional[Path] = ConfigOpt,
    task: Optional[str] = typer.Option(None, help="sst2, cola, mrpc, stsb, rte, qnli, e2e, commonsense (or one of its 8 tasks), instruction."),
    method: Optional[str] = typer.Option(None, help="kasa, peft-kasa, lora, pissa, milora, dora, full."),
    model: Optional[str] = typer.Option(None, help="minilm, smollm2, tiny-bert, tiny-llama, a local dir or a Hub id."),
    output_dir: Optional[str] = typer.Option(None, help="Run directory."),
    data_dir: Optional[str] = typer.Option(None, envvar="KASA_DATA_DIR", help="Local data root (layout of shared/data)."),
    demo_data: Optional[bool] = typer.Option(None, "--demo-data", help="Use the SST-2 subset shipped with the package."),
    r: Optional[int] = typer.Option(None, help="Adapter rank."),
    lora_alpha: Optional[float] = typer.Option(None),
    target_modules: Optional[str] = typer.Option(None, help="Comma-separated module names, or all-linear."),
    beta: Optional[float] = typer.Option(None), gamma: Optional[float] = typer.Option(None),
    learning_rate: Optional[float] = typer.Option(None), epochs: Optional[float] = typer.Option(None),
    max_steps: Optional[int] = typer.Option(None), batch_size: Optional[int] = typer.Option(None),
    max_length: Optional[int] = typer.Option(None), train_limit: Optional[int] = typer.Option(None),
    eval_limit: Optional[int] = typer.Option(None), seed: Optional[int] = typer.Option(None),
    save_steps: Optional[int] = typer.Option(None), num_beams: Optional[int] = typer.Option(None),
    max_new_tokens: Optional[int] = typer.Option(None),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete checkpoint in the run dir."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing run dir first."),
) -> None:
    """Train one method on one task and evaluate it; writes run_dir/{config.json, metrics.jsonl, result.json}."""
    _offline_defaults()
    from .runner import run_experiment

    try:
        cfg = _run_options(config, task=task, method=method, model=model, output_dir=output_dir, data_dir=data_dir,
                           demo_data=demo_data, r=r, lora_alpha=lora_alpha, target_modules=target_modules, beta=beta,
                           gamma=gamma, learning_rate=learning_rate, epochs=epochs, max_steps=max_steps,
                           batch_size=batch_size, max_length=max_length, train_limit=train_limit, eval_limit=eval_limit,
                           seed=seed, save_steps=save_steps, num_beams=num_beams, max_new_tokens=max_new_tokens)
        result = run_experiment(cfg, resume=resume, overwrite=overwrite)
    except _USER_ERRORS as error:
        _fail(error)
    if result:
        _print_result(result, cfg.run_dir)


def _print_result(result: dict, run_dir: Path) -> None:
    table = Table(title=f"{result['task']} · {result['method']} · seed {result['seed']}")
    table.add_column("metric")
    table.add_column("final", justify="right")
    table.add_column("best", justify="right")
    for key, value in result["final"].items():
        best = result["best"].get(key)
        table.add_row(key, f"{value:.4f}", f"{best:.4f}" if isinstance(best, (int, float)) else "")
    console.print(table)
    console.print(f"run dir: {run_dir}")


@app.command("eval")
def evaluate(
    run_dir: Path = typer.Argument(..., help="A finished run directory (its adapter/ and config.json are used)."),
    eval_limit: Optional[int] = typer.Option(None, help="Evaluate on the first N examples only."),
) -> None:
    """Re-evaluate a trained run's saved adapter on its task; writes run_dir/eval.json."""
    _offline_defaults()
    from .evaluate import evaluate_run

    try:
        metrics = evaluate_run(run_dir, eval_limit=eval_limit)
    except _USER_ERRORS as error:
        _fail(error)
    console.print_json(json.dumps(metrics))


@app.command()
def compare(
    config: Optional[Path] = ConfigOpt,
    task: Optional[str] = typer.Option(None), model: Optional[str] = typer.Option(None),
    methods: str = typer.Option("kasa,lora", help="Comma-separated methods."),
    seeds: str = typer.Option("0", help="Comma-separated seeds."),
    output_dir: Path = typer.Option(Path("runs/compare"), help="Parent directory of the runs and the report."),
    data_dir: Optional[str] = typer.Option(None, envvar="KASA_DATA_DIR"),
    demo_data: Optional[bool] = typer.Option(None, "--demo-data"),
    r: Optional[int] = typer.Option(None), learning_rate: Optional[float] = typer.Option(None),
    epochs: Optional[float] = typer.Option(None), max_steps: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None), train_limit: Optional[int] = typer.Option(None),
    eval_limit: Optional[int] = typer.Option(None), max_length: Optional[int] = typer.Option(None),
    resume: bool = typer.Option(False, "--resume", help="Skip finished runs, resume unfinished ones."),
) -> None:
    """Run several methods × seeds with identical settings and print one table (also compare.md / compare.json)."""
    _offline_defaults()
    from .compare import run_comparison

    try:
        summary_table = run_comparison(
            config, [m.strip() for m in methods.split(",") if m.strip()], [int(s) for s in seeds.split(",")],
            output_dir, resume=resume, task=task, model=model, data_dir=data_dir, demo_data=demo_data, r=r,
            learning_rate=learning_rate, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
            train_limit=train_limit, eval_limit=eval_limit, max_length=max_length,
        )
    except _USER_ERRORS as error:
        _fail(error)
    console.print(summary_table)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories or parents of run directories."),
    output_dir: Path = typer.Option(Path("report"), help="Where report.md and the PNG plots go."),
) -> None:
    """Markdown tables (best and final epoch) and plots from result JSONs."""
    from .report import build_report, find_runs, rich_table, summarize

    try:
        path = build_report(list(runs), output_dir)
        console.print(rich_table(summarize(find_runs(list(runs))), "best"))
    except _USER_ERRORS as error:
        _fail(error)
    console.print(f"report: {path}")


@app.command()
def inspect(
    model: str = typer.Option(..., help="minilm, smollm2, tiny-bert, tiny-llama, a local dir or a Hub id."),
    targets: str = typer.Option(..., help="Comma-separated module names, or all-linear."),
    r: int = typer.Option(8, help="Adapter rank = number of dropped singular triplets."),
    data: Optional[Path] = typer.Option(None, help="Calibration text: .txt (paragraphs) or .jsonl ('text'); default: a built-in English paragraph."),
    per_module_loss: bool = typer.Option(False, "--per-module-loss", help="Also the loss change with only that module truncated (one pass each)."),
    basis: str = typer.Option("weight", help="weight (the paper) or activation (research variant, not the paper's method)."),
    basis_data: Optional[Path] = typer.Option(None, help="--basis activation: texts to fit the basis on (default: --data); measure on held-out text."),
    activation_damping: float = typer.Option(0.01, help="--basis activation: damping δ of the input second moment."),
    threshold: float = typer.Option(0.1, help="Flag modules whose relative output change exceeds this."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON (a run dir: its truncation_report.json)."),
) -> None:
    """What KaSA's truncation does before training: per-module dropped energy, σ ratio, output change; the loss change."""
    _offline_defaults()
    from .inspect_truncation import inspect_truncation, rich_table, summary_lines, write_report

    target_list = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    try:
        result, meta = inspect_truncation(model, target_list, r=r, data=data, per_module_loss=per_module_loss,
                                          basis=basis, max_output_change=threshold, basis_data=basis_data,
                                          activation_damping=activation_damping)
    except _USER_ERRORS as error:
        _fail(error)
    console.print(rich_table(result, f"KaSA truncation of {model} (r={r}, {basis} basis, nothing trained)"))
    for line in summary_lines(result):
        console.print(line, highlight=False)
    if json_out is not None:
        console.print(f"report: {write_report(result, meta, json_out)}")


@app.command()
def merge(
    adapter_dir: Path = typer.Argument(..., help="A saved adapter (run_dir/adapter or any save_pretrained dir)."),
    output_dir: Path = typer.Argument(..., help="Where to write the merged transformers model."),
    model: Optional[str] = typer.Option(None, help="Base model; default: the one recorded in the run's config.json."),
) -> None:
    """Fold an adapter into its base model and save a plain transformers model directory."""
    _offline_defaults()
    from .evaluate import merge_adapter

    try:
        merge_adapter(adapter_dir, output_dir, model)
    except _USER_ERRORS as error:
        _fail(error)
    console.print(f"merged model written to {output_dir}")


@score_app.command("e2e")
def score_e2e_command(
    hypotheses: Path = typer.Argument(..., help="System outputs, one per line."),
    references: Path = typer.Argument(..., help="References grouped per MR, groups separated by blank lines."),
) -> None:
    """BLEU, NIST, METEOR, ROUGE_L, CIDEr as the official E2E script defines them; prints JSON."""
    from .metrics.e2e import score_e2e_files

    try:
        scores = score_e2e_files(hypotheses, references)
    except (*_USER_ERRORS, RuntimeError) as error:
        _fail(error)
    sys.stdout.write(json.dumps(scores, indent=2) + "\n")


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), help="Where the two runs and the report go."),
    train_limit: int = typer.Option(2000, help="Training sentences from the shipped SST-2 subset (2,000 at most)."),
    eval_limit: int = typer.Option(500, help="Dev sentences to evaluate on (500 at most)."),
    epochs: float = typer.Option(3.0),
) -> None:
    """KaSA vs LoRA on a real GLUE task (SST-2 subset shipped with the package) with the packaged MiniLM, on the CPU."""
    _offline_defaults()
    from .compare import run_comparison

    console.print("[bold]kasa demo[/]: MiniLM (all-MiniLM-L6-v2, real weights) on SST-2, KaSA vs LoRA, r=8, q/v targets")
    if output_dir.exists():
        console.print(f"finished runs in {output_dir} are reused; delete it to train again")
    try:
        table = run_comparison(
            None, ["kasa", "lora"], [0], output_dir, resume=True, task="sst2", model="minilm", demo_data=True,
            train_limit=train_limit, eval_limit=eval_limit, epochs=epochs, batch_size=16, max_length=64,
            learning_rate=1e-3, logging_steps=10, save_steps=50,
        )
    except _USER_ERRORS as error:
        _fail(error)
    console.print(table)
    console.print(f"runs and report under {output_dir}")


if __name__ == "__main__":  # pragma: no cover
    app()
