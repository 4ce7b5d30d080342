"""The ``kasa`` command line: train, eval, compare, report, merge, score, demo.

Errors have one path (:class:`OneLineErrors`, the root command group): a user mistake — a bad flag or config value,
a missing or malformed file, an unknown model — ends in one line ``error: ...`` on stderr and exit code 2; anything
else (a bug) in one line with exit code 1. ``kasa --debug ...`` (or ``KASA_DEBUG=1``) shows the traceback instead.
Commands therefore just raise. Hugging Face offline defaults are set when ``kasa_peft.experiments`` is imported,
before any Hugging Face library is.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

USAGE_EXIT_CODE = 2  # user mistakes, as click uses for usage errors
INTERNAL_EXIT_CODE = 1

# Exceptions that mean "the input is wrong" (our loaders and configs raise ValueError subclasses naming the file or
# key; the OS names the file in OSError; the library raises TypeError for unsupported target modules; a missing
# optional package is an ImportError). Matched by name for libraries we do not import here.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, TypeError, ImportError)
_USER_ERROR_NAMES = {"SafetensorError", "YAMLError"}

_debug = {"enabled": False}


def _one_line(error: BaseException | str) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


def _is_a(error: BaseException, class_name: str) -> bool:
    return any(cls.__name__ == class_name for cls in type(error).__mro__)


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, _USER_ERRORS) or any(_is_a(error, name) for name in _USER_ERROR_NAMES)


class OneLineErrors(TyperGroup):
    """The root command group: runs every command and turns whatever it raises into one ``error:`` line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra: Any) -> Any:
        _debug["enabled"] = os.environ.get("KASA_DEBUG", "") not in ("", "0")
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as error:  # noqa: BLE001 - the one place where errors become messages
            # click's exceptions are matched by name: typer ≥ 0.2x vendors its own copy of click.
            if _is_a(error, "NoArgsIsHelpError"):
                error.show()  # the help text, as click prints it
                code = error.exit_code
            elif _is_a(error, "ClickException"):  # bad flag syntax or type, found before a command runs
                hint = f" (see '{error.ctx.command_path} --help')" if getattr(error, "ctx", None) is not None else ""
                _print_error(_one_line(error.format_message()) + hint)
                code = error.exit_code
            elif _is_a(error, "Abort"):
                _print_error("aborted")
                code = INTERNAL_EXIT_CODE
            elif _debug["enabled"]:
                raise
            elif is_user_error(error):
                _print_error(_one_line(error))
                code = USAGE_EXIT_CODE
            else:
                _print_error(f"{type(error).__name__}: {_one_line(error)} "
                             "(unexpected; rerun with 'kasa --debug ...' for the traceback)")
                code = INTERNAL_EXIT_CODE
        else:
            code = result if isinstance(result, int) else 0
            if not standalone_mode:
                return result
        if standalone_mode:
            sys.exit(code)
        return code


def _print_error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


app = typer.Typer(cls=OneLineErrors, help="KaSA experiments: train and compare KaSA against LoRA-family baselines, offline.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
score_app = typer.Typer(help="Score system outputs with the official metric definitions.", no_args_is_help=True)
app.add_typer(score_app, name="score")
console = Console(stderr=False)


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error (for bug reports)."),
) -> None:
    """KaSA experiments: train and compare KaSA against LoRA-family baselines, offline."""
    _debug["enabled"] = _debug["enabled"] or debug


def _run_options(config_file, **flags):
    from .runconfig import build_config

    return build_config(config_file, **flags)


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=f"'{flag}'") from None


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
    ("quantize", str, "Load the base 4bit (nf4, QLoRA-style) or 8bit with bitsandbytes; pip install 'kasa-peft[quant]'.", ()),
    ("truncation_guard", str, "kasa: off, warn or skip modules whose truncation changes their calibration output too much; budget: keep the fewest modules whole that hold the calibration loss within --truncation-guard-loss-tolerance.", ()),
    ("truncation_guard_loss_tolerance", float, "kasa, --truncation-guard budget: relative tolerance on the calibration loss (0.05 = within 5 %).", ()),
    ("truncation_basis", str, "kasa: weight (the paper) or activation (research variant, not the paper's method).", ()),
    ("calibration_examples", int, "kasa: training examples fed to the truncation guard / activation basis.", ()),
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run; the old run is kept until the new one has finished."),
    run_flags: Optional[dict] = None,
) -> None:
    """Train one method on one task and evaluate it; writes run_dir/{config.json, metrics.jsonl, result.json}."""
    cfg = _run_options(config, method=method, output_dir=output_dir, seed=seed, **run_flags)
    if print_config:
        _print_config_json(cfg.to_dict())
        return
    from .runner import run_experiment  # the deep-learning stack: only once the settings are valid

    result = run_experiment(cfg, resume=resume, overwrite=overwrite)
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
    from .evaluate import evaluate_run

    metrics = evaluate_run(run_dir, eval_limit=eval_limit, eval_file=eval_file, data_dir=data_dir)
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
    from .compare import comparison_configs, run_comparison

    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    seed_list = _int_list("--seeds", seeds)
    if print_config:
        _print_config_json([c.to_dict() for c in comparison_configs(config, method_list, seed_list, output_dir, **run_flags)])
        return
    summary_table = run_comparison(config, method_list, seed_list, output_dir, resume=resume, **run_flags)
    console.print(summary_table)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories or parents of run directories."),
    output_dir: Path = typer.Option(Path("report"), help="Where report.md and the PNG plots go."),
) -> None:
    """Markdown tables (best and final epoch) and plots from result JSONs."""
    from .report import build_report, find_runs, rich_table, summarize

    path = build_report(list(runs), output_dir)
    console.print(rich_table(summarize(find_runs(list(runs))), "best"))
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
    from .inspect_truncation import inspect_truncation, rich_table, summary_lines, write_report

    target_list = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    result, meta = inspect_truncation(model, target_list, r=r, data=data, per_module_loss=per_module_loss,
                                      basis=basis, max_output_change=threshold, basis_data=basis_data,
                                      activation_damping=activation_damping)
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT_DIR if it holds an earlier `kasa merge` output (never other files)."),
) -> None:
    """Fold an adapter into its base model and save a plain transformers model directory (a new or empty folder)."""
    from .evaluate import merge_adapter

    merge_adapter(adapter_dir, output_dir, model, overwrite=overwrite)
    console.print(f"merged model written to {output_dir}")


@app.command("export")
def export(
    source: Path = typer.Argument(..., help="A `kasa train` run directory or a KaSA adapter directory."),
    output_dir: Path = typer.Argument(..., help="Where to write the PEFT checkpoint (adapter_config.json + weights)."),
    format: str = typer.Option("lora", "--format", help="lora: exact rank-2r plain LoRA (any LoRA server); kasa: PEFT's KaSA."),
    model: Optional[str] = typer.Option(None, help="Base model; default: the one recorded in the run's config.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT_DIR if it holds an earlier `kasa export` output (never other files)."),
) -> None:
    """Export a KaSA adapter as a PEFT checkpoint (rank-2r LoRA by default) for LoRA-capable servers (a new or empty folder)."""
    from .export import export_adapter

    export_adapter(source, output_dir, format=format, model=model, overwrite=overwrite)
    console.print(f"PEFT {format} checkpoint written to {output_dir}")


@score_app.command("e2e")
def score_e2e_command(
    outputs: Path = typer.Argument(..., help="System outputs, one per line, or an E2E run directory (its e2e_hypotheses.txt "
                                   "and e2e_mrs.txt; also its step0/ or eval_<file>/ folder)."),
    references: Path = typer.Argument(..., help="References: grouped per MR with blank lines between groups (the official "
                                      "scorer's layout), a LoRA-format file or an mr,ref CSV such as testset_w_refs.csv."),
) -> None:
    """BLEU, NIST, METEOR, ROUGE_L, CIDEr as the official E2E script defines them; prints JSON.

    With a run directory and a references file that names MRs, each output is scored against its own MR's references
    (the file may hold more MRs than the run); an MR of the run missing from the file is an error.
    """
    from .eval_files import score_e2e_outputs

    scores = score_e2e_outputs(outputs, references)
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

    count = write_lora_format(csv_file, out_file)
    console.print(f"{count} lines written to {out_file}")


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), help="Where the two runs and the report go."),
    train_limit: int = typer.Option(2000, help="Training sentences from the shipped SST-2 subset (2,000 at most)."),
    eval_limit: int = typer.Option(500, help="Dev sentences to evaluate on (500 at most)."),
    epochs: float = typer.Option(3.0),
) -> None:
    """KaSA vs LoRA on a real GLUE task (SST-2 subset shipped with the package) with the packaged MiniLM, on the CPU."""
    from .compare import run_comparison

    console.print("[bold]kasa demo[/]: MiniLM (all-MiniLM-L6-v2, real weights) on SST-2, KaSA vs LoRA, r=8, q/v targets")
    if output_dir.exists():
        console.print(f"finished runs in {output_dir} are reused; delete it to train again")
    table = run_comparison(
        None, ["kasa", "lora"], [0], output_dir, resume=True, task="sst2", model="minilm", demo_data=True,
        train_limit=train_limit, eval_limit=eval_limit, epochs=epochs, batch_size=16, max_length=64,
        learning_rate=1e-3, logging_steps=10, save_steps=50,
    )
    console.print(table)
    console.print(f"runs and report under {output_dir}")


if __name__ == "__main__":  # pragma: no cover
    app()
