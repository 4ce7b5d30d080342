"""One training run: data → model → method → step-0 evaluation → Trainer → evaluation → ``run_dir/result.json``.

The runner is task-agnostic: everything about a task (data, encoding, metrics, evaluation, presets) comes from its
:class:`~kasa_peft.experiments.tasks.protocol.TaskFamily`. Every method goes through the same
``transformers.Trainer`` path (so ``accelerate launch`` gives DDP/FSDP), with checkpoints every ``save_steps`` marked
complete only once fully written, and ``resume=True`` continuing from the last complete one.

Before the first optimiser step the model is evaluated once (``step0_eval``; for KaSA that is after its truncation,
for PiSSA/MiLoRA after their re-parameterisation), so every result shows where its method starts. The RNG is
re-seeded afterwards, so the step-0 evaluation (which may sample) does not change training.

Files: ``config.json`` (the resolved config, preset values and what the run changed of them), ``metrics.jsonl``,
``step0/metrics.json`` (+ the step-0 outputs), ``result.json`` (written atomically at the very end: a run dir
without it is not a finished run), ``analysis.json``, ``adapter/``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed

import kasa_peft
from kasa_peft.checkpoint import atomic_write_text

from .generation import ListDataset
from .methods import AdapterSettings, kasa_sigma_by_layer, prepare_model
from .models import describe, load_model
from .presets import budget_record, deviations, resolve_preset
from .rundir import CHECKPOINT_SUBDIR, RunDirError, open_run_dir  # noqa: F401 - RunDirError re-exported
from .runconfig import RunConfig
from .tasks import family_of
from .tasks.protocol import TaskFamily

STEP0_SUBDIR = "step0"


# ----------------------------------------------------------------------------------------------- bookkeeping
class MetricsLogger(TrainerCallback):
    """Appends every Trainer log (train and eval) to ``metrics.jsonl`` on the main process."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        kind = "eval" if any(k.startswith("eval_") for k in logs) else "summary" if "train_runtime" in logs else "train"
        record = {"step": state.global_step, "epoch": state.epoch, "kind": kind, **logs}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def _truncate_metrics_log(path: Path, max_step: int) -> None:
    """On resume, drop log lines written after the checkpoint we go back to (they will be written again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= max_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _default_targets(model: torch.nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for pair in (["query", "value"], ["q_proj", "v_proj"], ["c_attn"]):
        if set(pair) <= names:
            return pair
    raise ValueError("Cannot guess target modules for this model; pass --target-modules.")


def _modules_to_save(model: torch.nn.Module, kind: str) -> list[str] | None:
    if kind != "classification":
        return None
    names = {name for name, _ in model.named_modules()}
    heads = [head for head in ("classifier", "score") if head in names]
    return heads or None


def _spectrum(model: torch.nn.Module, targets: list[str] | str, r: int) -> dict | None:
    """Singular values of the first targeted weight of the *original* model (for the spectrum plot)."""
    from kasa_peft.base_layers import is_supported, weight_matrix
    from kasa_peft.targeting import name_matches

    for name, module in model.named_modules():
        if is_supported(module) and (targets == "all-linear" or name_matches(name, targets)):
            values = torch.linalg.svdvals(weight_matrix(module).detach().double()).tolist()
            return {"module": name, "singular_values": values, "r": r}
    return None


def _calibration_batches(config: RunConfig, family: TaskFamily, train_items: list[dict], tokenizer) -> list[dict] | None:
    """The first ``calibration_examples`` training examples as one collated batch, for KaSA's truncation guard."""
    from kasa_peft import KasaConfig

    guard = config.truncation_guard or KasaConfig.__dataclass_fields__["truncation_guard"].default
    if config.method != "kasa" or (guard == "off" and config.truncation_basis == "weight") or config.calibration_examples <= 0:
        return None
    examples = family.encode(train_items[: config.calibration_examples], tokenizer, config)
    return [dict(family.collator(tokenizer)(examples))]


# ----------------------------------------------------------------------------------------------- the run
def run_experiment(config: RunConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train and evaluate one (task, method, seed); returns the ``result.json`` content.

    What may happen to an existing run directory (and how ``overwrite`` keeps the old run until the new one has
    finished) is decided in :mod:`.rundir`.
    """
    with open_run_dir(config.run_dir, resume=resume, overwrite=overwrite) as checkpoint:
        return _train_and_evaluate(config, checkpoint)


def _train_and_evaluate(config: RunConfig, checkpoint: Path | None) -> dict[str, Any]:
    run_dir = config.run_dir
    set_seed(config.seed)
    family = family_of(config.task)
    train_items = family.load_train(config)  # data first: bad data fails before any model load
    eval_data = family.load_eval(config)
    loaded = load_model(config.model, family.kind, num_labels=family.num_labels(config.task), quantize=config.quantize)
    tokenizer = loaded.tokenizer
    targets = config.target_modules or _default_targets(loaded.model)
    spectrum = _spectrum(loaded.model, targets, config.r)
    settings = AdapterSettings(
        r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=targets,
        modules_to_save=_modules_to_save(loaded.model, family.kind), beta=config.beta, gamma=config.gamma,
        regularization_form=config.regularization_form,
        truncation_guard=config.truncation_guard, truncation_guard_loss_tolerance=config.truncation_guard_loss_tolerance,
        truncation_basis=config.truncation_basis,
        calibration_batches=_calibration_batches(config, family, train_items, tokenizer),
    )
    set_seed(config.seed)  # adapter init independent of how much randomness model loading consumed
    prepared = prepare_model(loaded.model, config.method, settings)
    model = prepared.model
    if settings.calibration_batches is not None:  # what the truncation did, for `kasa report`'s per-layer plot
        report = model.truncation_report(settings.calibration_batches)
        atomic_write_text(run_dir / "truncation_report.json", json.dumps(report.to_dict(), indent=2))
    config_record = {**config.to_dict(), "family": family.name, "resolved_target_modules": targets,
                     "modules_to_save": settings.modules_to_save, "preset_values": resolve_preset(config.task, config.preset),
                     "changed_from_preset": deviations(config), "model_info": describe(loaded),
                     "kasa_peft_version": kasa_peft.__version__, "torch_version": torch.__version__}
    atomic_write_text(run_dir / "config.json", json.dumps(config_record, indent=2, default=str))

    train_dataset = ListDataset(family.encode(train_items, tokenizer, config))
    trainer_eval_items = family.trainer_eval_items(eval_data) if family.eval_during_training else None
    eval_dataset = ListDataset(family.encode(trainer_eval_items, tokenizer, config)) if trainer_eval_items is not None else None
    metrics_path = run_dir / "metrics.jsonl"
    if checkpoint is not None:
        _truncate_metrics_log(metrics_path, int(checkpoint.name.split("-")[-1]))
    else:
        metrics_path.unlink(missing_ok=True)

    args = _training_arguments(config, run_dir, family, len(train_dataset))
    trainer = prepared.trainer_class(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=family.collator(tokenizer),
        compute_metrics=family.compute_metrics(config) if eval_dataset is not None else None,
        compute_loss_func=family.loss_function(config), callbacks=[MetricsLogger(metrics_path)],
    )
    if prepared.regularizer is not None:
        trainer.regularizer = prepared.regularizer
    step0 = _step0_evaluation(family, model, tokenizer, config, eval_data, run_dir, checkpoint,
                              trainer.is_world_process_zero())
    set_seed(config.seed)  # the step-0 evaluation may have sampled: training starts from the Trainer's seeded state
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_runtime = time.perf_counter() - started

    started = time.perf_counter()
    final, best = _final_and_best(trainer, family, model, tokenizer, config, eval_data, run_dir, metrics_path)
    eval_runtime = time.perf_counter() - started

    if not trainer.is_world_process_zero():
        return {}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    _save_final_adapter(model, config.method, run_dir / "adapter")
    analysis = {"spectrum": spectrum, "sigma": kasa_sigma_by_layer(model)}
    atomic_write_text(run_dir / "analysis.json", json.dumps(analysis))
    result = {
        "status": "complete", "task": config.task, "family": family.name, "method": config.method,
        "model": config.model, "seed": config.seed, "primary_metric": family.primary_metric(config),
        "step0": step0, "final": final, "best": best,
        "budget": budget_record(config, len(train_dataset), trainer.state.global_step),
        "trainable_params": trainable, "total_params": total, "global_step": trainer.state.global_step,
        "train_runtime_s": train_runtime, "eval_runtime_s": eval_runtime,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "notes": prepared.notes + family.notes(config)
        + ([f"learning rate {config.full_learning_rate} for full fine-tuning"] if config.method == "full" else []),
    }
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2))
    return result


def _training_arguments(config: RunConfig, run_dir: Path, family: TaskFamily, train_size: int) -> TrainingArguments:
    """The Trainer settings of a run: AdamW, linear schedule, warm-up from ``warmup_steps`` or ``warmup_ratio``."""
    args = TrainingArguments(
        output_dir=str(run_dir / CHECKPOINT_SUBDIR),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.effective_learning_rate,
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        warmup_steps=0,
        lr_scheduler_type="linear",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        eval_strategy="epoch" if family.eval_during_training else "no",
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
        save_only_model=False,
    )
    per_step = config.batch_size * config.gradient_accumulation_steps * max(1, args.world_size)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(math.ceil(train_size / per_step) * config.epochs)
    args.warmup_steps = config.warmup_steps if config.warmup_steps > 0 else int(config.warmup_ratio * total_steps)
    return args


def _step0_evaluation(family: TaskFamily, model, tokenizer, config: RunConfig, eval_data: Any, run_dir: Path,
                      checkpoint: Path | None, is_main: bool) -> dict[str, float] | None:
    """Metrics before the first optimiser step, written to ``step0/metrics.json`` (read back on resume)."""
    path = run_dir / STEP0_SUBDIR / "metrics.json"
    if not config.step0_eval:
        return None
    if checkpoint is not None:  # resumed: it ran before the first checkpoint was written
        return json.loads(path.read_text()) if path.is_file() else None
    if not is_main:
        return None
    metrics = family.evaluate(model, tokenizer, config, eval_data, run_dir / STEP0_SUBDIR)
    atomic_write_text(path, json.dumps(metrics, indent=2))
    return metrics


def _final_and_best(trainer, family: TaskFamily, model, tokenizer, config: RunConfig, eval_data: Any, run_dir: Path,
                    metrics_path: Path) -> tuple[dict, dict]:
    """Final metrics and those of the best evaluated epoch (the final ones where evaluation runs only at the end)."""
    if not family.eval_during_training:
        final = family.evaluate(model, tokenizer, config, eval_data, run_dir) if trainer.is_world_process_zero() else {}
        return final, {**final, "epoch": trainer.state.epoch}
    evals = _eval_history(metrics_path)
    if not evals or evals[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()
        evals = _eval_history(metrics_path)
    primary = family.primary_metric(config)
    bookkeeping = {"runtime", "samples_per_second", "steps_per_second"}

    def strip(record: dict) -> dict:
        return {k[5:]: v for k, v in record.items()
                if k.startswith("eval_") and k[5:] not in bookkeeping and isinstance(v, (int, float))}

    best_record = max(evals, key=lambda rec: rec.get(f"eval_{primary}", float("-inf")))
    return strip(evals[-1]), {**strip(best_record), "epoch": best_record.get("epoch")}


def _eval_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [rec for rec in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if rec["kind"] == "eval"]


def _save_final_adapter(model: torch.nn.Module, method: str, path: Path) -> None:
    if method == "full":
        return  # a full copy of the model is the checkpoint; not duplicated here
    model.save_pretrained(str(path))
