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

# Run settings settable on both `train` and `compare` (every preset field among them): (RunConfig field, type, help,
# extra flag names). Flag = --field-name; booleans get --x/--no-x. None = "not given": preset/file value stays.
RUN_FLAGS: tuple[tuple[str, type, str, tuple[str, ...]], ...] = (
    ("task", str, "sst2, cola, mrpc, stsb, rte, qnli, e2e, commonsense (or one of its 8 tasks), instruction.", ()),
    ("model", str, "minilm, smollm2, tiny-bert, tiny-llama, a local dir or a Hub id.", ()),
    ("data_dir", str, "Local data root (layout of shared/data); env KASA_DATA_DIR.", ()),
    ("demo_data", bool, "Use the SST-2 subset shipped with the package.", ()),
    ("preset", str, "quick (small CPU defaults) or paper (the paper's protocol for the task); flags override it.", ()),
    ("r", int, "Adapter rank.", ()),
    ("lora_alpha", float, "Adapter scale numerator (scaling α/r).", ()),
    ("lora_dropout", float, "Dropout on the adapter input.", ()),
    ("target_modules", str, "Comma-separated module names, or all-linear.", ()),
    ("beta", float, "KaSA: weight of Σσ².", ()),
    ("gamma", float, "KaSA: weight of the orthogonality terms.", ()),
    ("regularization_form", str, "KaSA regulariser: paper (default) or authors (their released script).", ()),
    ("learning_rate", float, "Peak learning rate (AdamW, linear schedule).", ()),
    ("full_learning_rate", float, "Learning rate of the `full` method.", ()),
    ("epochs", float, "Training epochs (a cap when below the preset's).", ()),
    ("max_steps", int, "Stop after this many optimiser steps (a budget cap).", ()),
    ("batch_size", int, "Per-device training batch size.", ()),
    ("eval_batch_size", int, "Evaluation / decoding batch size.", ()),
    ("gradient_accumulation_steps", int, "Micro-batches per optimiser step.", ()),
    ("warmup_ratio", float, "Linear warm-up as a fraction of all steps.", ()),
    ("warmup_steps", int, "Linear warm-up steps (replaces --warmup-ratio when > 0).", ()),
    ("weight_decay", float, "AdamW weight decay.", ()),
    ("label_smoothing", float, "Label smoothing of the training loss.", ()),
    ("max_length", int, "Token cutoff of a training example.", ()),
    ("train_limit", int, "Budget cap: train on a fixed seeded subset of N examples.", ("--max-train-examples", "--train-limit")),
    ("eval_limit", int, "Evaluate on a fixed seeded subset of N examples (MR groups, questions).", ("--max-eval-examples", "--eval-limit")),
    ("save_steps", int, "Checkpoint every N steps.", ()),
    ("logging_steps", int, "Log the training loss every N steps.", ()),
    ("num_beams", int, "Beam width when decoding.", ()),
    ("length_penalty", float, "Beam-search length penalty.", ()),
    ("no_repeat_ngram_size", int, "Block repeated n-grams of this size when decoding (0 = off).", ()),
    ("max_new_tokens", int, "New-token cap when decoding.", ()),
    ("train_on_inputs", bool, "Causal tasks: prompt tokens are labels too.", ()),
    ("step0_eval", bool, "Evaluate before the first optimiser step (default on).", ()),
    ("judge_model", str, "instruction: a local judge model directory.", ()),
)


def _run_flag_parameter(name: str, kind: type, help_text: str, names: tuple[str, ...]):
    import inspect

    flag = "--" + name.replace("_", "-")
    decls = names or ((f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,))
    extra = {"envvar": "KASA_DATA_DIR"} if name == "data_dir" else {}
    option = typer.Option(None, *decls, help=help_text, **extra)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind])


def with_run_flags(command):
    """Give ``command`` every :data:`RUN_FLAGS` option; it receives them as one dict ``run_flags`` (None = unset)."""
    import functools
    import inspect

    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "run_flags"]
    flags = [_run_flag_parameter(*spec) for spec in RUN_FLAGS]

    @functools.wraps(command)
    def wrapper(**kwargs):
        run_flags = {spec[0]: kwargs.pop(spec[0]) for spec in RUN_FLAGS}
        return command(run_flags=run_flags, **kwargs)

    wrapper.__signature__ = inspect.Signature(own + flags)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + flags}
    del wrapper.__wrapped__  # typer must read the new signature, not the wrapped one
    return wrapper


def _print_config_json(records) -> None:
    sys.stdout.write(json.dumps(records, indent=2, default=str) + "\n")


@app.command()
@with_run_flags
def train(
    config: Optional[Path] = ConfigOpt,
    method: Optional[str] = typer.Option(None, help="kasa, peft-kasa, lora, pissa, milora, dora, full."),
    output_dir: Optional[str] = typer.Option(None, help="Run directory."),
    seed: Optional[int] = typer.Option(None),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as JSON and exit (no model is loaded)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete checkpoint in the run dir."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing run dir first."),
    run_flags: Optional[dict] = None,
) -> None:
    """Train one method on one task and evaluate it; writes run_dir/{config.json, metrics.jsonl, result.json}."""
    _offline_defaults()
    try:
        cfg = _run_options(config, method=method, output_dir=output_dir, seed=seed, **run_flags)
        if print_config:
            _print_config_json(cfg.to_dict())
            return
        from .runner import run_experiment

        result = run_experiment(cfg, resume=resume, overwrite=overwrite)
    except _USER_ERRORS as error:
        _fail(error)
    if result:
        _print_result(result, cfg.run_dir)


def _print_result(result: dict, run_dir: Path) -> None:
    table = Table(title=f"{result['task']} · {result['method']} · seed {result['seed']}")
    table.add_column("metric")
    table.add_column("step 0", justify="right")
    table.add_column("final", justify="right")
    table.add_column("best", justify="right")
    number = lambda value: f"{value:.4f}" if isinstance(value, (int, float)) else ""  # noqa: E731
    for key, value in result["final"].items():
        table.add_row(key, number((result.get("step0") or {}).get(key)), number(value), number(result["best"].get(key)))
    console.print(table)
    console.print(f"run dir: {run_dir}")


@app.command("eval")
def evaluate(
    run_dir: Path = typer.Argument(..., help="A finished run directory (its adapter/ and config.json are used)."),
    eval_limit: Optional[int] = typer.Option(None, help="Evaluate on a fixed seeded subset of N examples."),
    eval_file: Optional[Path] = typer.Option(None, "--eval-file", help="A labelled file in the task's layout (GLUE dev TSV, E2E LoRA-format or testset_w_refs.csv, LLM-Adapters JSON); only it is read."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Data root for the task's own eval split (default: the run's)."),
) -> None:
    """Re-evaluate a trained run's saved adapter (task eval split, or --eval-file); writes run_dir/eval*.json."""
    _offline_defaults()
    from .evaluate import evaluate_run

    try:
        metrics = evaluate_run(run_dir, eval_limit=eval_limit, eval_file=eval_file, data_dir=data_dir)
    except _USER_ERRORS as error:
        _fail(error)
    console.print_json(json.dumps(metrics))


@app.command()
@with_run_flags
def compare(
    config: Optional[Path] = ConfigOpt,
    methods: str = typer.Option("kasa,lora", help="Comma-separated methods."),
    seeds: str = typer.Option("0", help="Comma-separated seeds."),
    output_dir: Path = typer.Option(Path("runs/compare"), help="Parent directory of the runs and the report."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config of every run as JSON and exit."),
    resume: bool = typer.Option(False, "--resume", help="Skip finished runs, resume unfinished ones."),
    run_flags: Optional[dict] = None,
) -> None:
    """Run several methods × seeds with identical settings and print one table (also compare.md / compare.json)."""
    _offline_defaults()
    from .compare import comparison_configs, run_comparison

    try:
        method_list = [m.strip() for m in methods.split(",") if m.strip()]
        seed_list = [int(s) for s in seeds.split(",")]
        if print_config:
            _print_config_json([c.to_dict() for c in comparison_configs(config, method_list, seed_list, output_dir, **run_flags)])
            return
        summary_table = run_comparison(config, method_list, seed_list, output_dir, resume=resume, **run_flags)
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


data_app = typer.Typer(help="Convert datasets into the layouts the paper's pipelines use.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("e2e-lora-format")
def data_e2e_lora_format(
    csv_file: Path = typer.Argument(..., help="An E2E dataset CSV with header mr,ref (trainset, devset, testset_w_refs)."),
    out_file: Path = typer.Argument(..., help="Where to write the LoRA-format 'MR||reference' lines."),
) -> None:
    """E2E CSV → the LoRA repository's pre-tokenised MR||reference lines (devset.csv gives LoRA's valid.txt)."""
    from .tasks.e2e_lora_format import write_lora_format

    try:
        count = write_lora_format(csv_file, out_file)
    except _USER_ERRORS as error:
        _fail(error)
    console.print(f"{count} lines written to {out_file}")


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
