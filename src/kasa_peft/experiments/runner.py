"""One training run: data → model → method → Trainer → evaluation → ``run_dir/{config.json, metrics.jsonl, result.json}``.

Every method goes through the same ``transformers.Trainer`` path (so ``accelerate launch`` gives DDP/FSDP), with
checkpoints every ``save_steps`` marked complete only once fully written, and ``resume=True`` continuing from the last
complete one. ``result.json`` is written atomically at the very end: a run dir without it is not a finished run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import DataCollatorWithPadding, TrainerCallback, TrainingArguments, set_seed

import kasa_peft
from kasa_peft.checkpoint import atomic_write_text

from .generation import ListDataset, SFTCollator, encode_sft_example, generate_texts
from .methods import AdapterSettings, kasa_sigma_by_layer, prepare_model
from .models import describe, load_model
from .rundir import CHECKPOINT_SUBDIR, RunDirError, open_run_dir  # noqa: F401 - RunDirError re-exported
from .runconfig import COMMONSENSE_TASK_NAMES, RunConfig

@dataclass
class TaskSetup:
    """What a task family hands to the runner."""

    kind: str  # "classification" | "causal"
    num_labels: int
    train_items: list[dict]
    collator_factory: Callable[[Any], Any]
    evaluate: Callable[[Any, Any, RunConfig, Path], dict[str, float]]  # (model, tokenizer, config, run_dir)
    primary_metric: str
    eval_during_training: bool = False
    eval_items: list[dict] | None = None
    compute_metrics: Callable | None = None


# ----------------------------------------------------------------------------------------------- task families
def _glue_setup(config: RunConfig, tokenizer_holder: dict) -> TaskSetup:
    from .metrics.glue import PRIMARY_METRIC, compute_glue_metrics
    from .tasks import glue

    task = config.task
    if config.demo_data:
        if task != "sst2":
            raise ValueError("--demo-data ships SST-2 only; use --task sst2 or pass --data-dir.")
        train = glue.load_demo_sst2("train", limit=config.train_limit)
        dev = glue.load_demo_sst2("validation", limit=config.eval_limit)
    else:
        train = glue.load_glue(task, "train", data_dir=config.data_dir, limit=config.train_limit)
        dev = glue.load_glue(task, "validation", data_dir=config.data_dir, limit=config.eval_limit)
    regression = task == "stsb"

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = logits.squeeze(-1) if regression else np.argmax(logits, axis=-1)
        return compute_glue_metrics(task, predictions, labels)

    def encode(items: list[dict], tokenizer) -> list[dict]:
        encoded = []
        for item in items:
            features = tokenizer(item["sentence1"], item.get("sentence2"), truncation=True, max_length=config.max_length)
            features["labels"] = float(item["label"]) if regression else int(item["label"])
            encoded.append(dict(features))
        return encoded

    tokenizer_holder["encode"] = encode
    return TaskSetup(
        kind="classification",
        num_labels=1 if regression else 2,
        train_items=train,
        eval_items=dev,
        collator_factory=lambda tokenizer: DataCollatorWithPadding(tokenizer),
        evaluate=lambda *args: {},  # the Trainer evaluates GLUE every epoch
        primary_metric=PRIMARY_METRIC[task],
        eval_during_training=True,
        compute_metrics=compute_metrics,
    )


def _causal_collator(tokenizer):
    return SFTCollator(tokenizer.pad_token_id)


def _e2e_setup(config: RunConfig, tokenizer_holder: dict) -> TaskSetup:
    from .metrics.e2e import score_e2e
    from .tasks import e2e

    train = e2e.load_e2e("train", config.data_dir, limit=config.train_limit)
    groups = e2e.load_e2e_grouped("validation", config.data_dir, limit=config.eval_limit)

    def evaluate(model, tokenizer, cfg: RunConfig, run_dir: Path) -> dict[str, float]:
        prompts = [prompt for prompt, _ in groups]
        hypotheses = generate_texts(model, tokenizer, prompts, cfg.eval_batch_size, cfg.beams, cfg.max_new_tokens,
                                    description="E2E decoding")
        e2e.write_hypothesis_file(hypotheses, run_dir / "e2e_hypotheses.txt")
        e2e.write_e2e_reference_file([refs for _, refs in groups], run_dir / "e2e_references.txt")
        return score_e2e(hypotheses, [refs for _, refs in groups])

    tokenizer_holder["encode"] = lambda items, tok: [encode_sft_example(tok, i["prompt"], " " + i["target"], config.max_length) for i in items]
    return TaskSetup("causal", 0, train, _causal_collator, evaluate, "BLEU")


def _commonsense_setup(config: RunConfig, tokenizer_holder: dict) -> TaskSetup:
    from .tasks import commonsense as cs

    eval_tasks = list(COMMONSENSE_TASK_NAMES) if config.task == "commonsense" else [config.task]
    train = cs.build_commonsense_training_mix(config.data_dir, per_task_limit=config.train_limit, seed=config.seed)
    eval_sets = {task: cs.load_commonsense(task, "test", config.data_dir, limit=config.eval_limit) for task in eval_tasks}

    def evaluate(model, tokenizer, cfg: RunConfig, run_dir: Path) -> dict[str, float]:
        metrics: dict[str, float] = {}
        records = []
        for task, items in eval_sets.items():
            prompts = [cs.generate_prompt(item["instruction"], item.get("input")) for item in items]
            outputs = generate_texts(model, tokenizer, prompts, cfg.eval_batch_size, cfg.beams, cfg.max_new_tokens,
                                     description=f"{task} decoding")
            correct = 0
            for item, output in zip(items, outputs):
                predicted = cs.extract_answer(task, output)
                correct += int(predicted == item["answer"])
                records.append({"task": task, "output": output, "predicted": predicted, "answer": item["answer"]})
            metrics[f"{task}_accuracy"] = correct / max(1, len(items))
        metrics["accuracy"] = float(np.mean([metrics[f"{t}_accuracy"] for t in eval_sets]))
        atomic_write_text(run_dir / "commonsense_outputs.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        return metrics

    def encode(items, tok):
        return [
            encode_sft_example(tok, cs.generate_prompt(i["instruction"], i.get("input")), i["output"], config.max_length)
            for i in items
        ]

    tokenizer_holder["encode"] = encode
    return TaskSetup("causal", 0, train, _causal_collator, evaluate, "accuracy")


def _instruction_setup(config: RunConfig, tokenizer_holder: dict) -> TaskSetup:
    from .metrics.e2e import score_e2e
    from .tasks import instruction

    train = instruction.load_instruction_sft(config.data_dir, limit=config.train_limit, seed=config.seed)
    questions = instruction.load_mt_bench_questions(config.data_dir)
    if config.eval_limit:
        questions = questions[: config.eval_limit]
    references = instruction.load_mt_bench_references(config.data_dir)

    def chat_prompt(tokenizer, user_text: str) -> str:
        messages = [{"role": "user", "content": user_text}]
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"User: {user_text}\nAssistant:"

    def evaluate(model, tokenizer, cfg: RunConfig, run_dir: Path) -> dict[str, float]:
        prompts = [chat_prompt(tokenizer, q["turns"][0]) for q in questions]
        answers = generate_texts(model, tokenizer, prompts, cfg.eval_batch_size, cfg.beams, cfg.max_new_tokens,
                                 description="MT-Bench turn 1")
        records = [{"question_id": q["question_id"], "category": q["category"], "answer": a} for q, a in zip(questions, answers)]
        atomic_write_text(run_dir / "mt_bench_answers.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        with_refs = [(a, references[q["question_id"]][0]) for q, a in zip(questions, answers) if q["question_id"] in references]
        metrics: dict[str, float] = {"answered": float(len(answers)), "with_reference": float(len(with_refs))}
        if with_refs:
            scores = score_e2e([a if a.strip() else "." for a, _ in with_refs], [[r] for _, r in with_refs], metrics=("BLEU", "ROUGE_L"))
            metrics.update({f"ref_{k}": v for k, v in scores.items()})
        if cfg.judge_model:
            from .judge import judge_answers

            metrics.update(judge_answers(cfg.judge_model, questions, answers, cfg.data_dir))
        return metrics

    def encode(items, tok):
        encoded = []
        for item in items:
            user = next(m["content"] for m in item["messages"] if m["role"] == "user")
            reply = next(m["content"] for m in item["messages"] if m["role"] == "assistant")
            encoded.append(encode_sft_example(tok, chat_prompt(tok, user), reply, config.max_length))
        return encoded

    tokenizer_holder["encode"] = encode
    return TaskSetup("causal", 0, train, _causal_collator, evaluate, "ref_ROUGE_L")


FAMILY_SETUPS = {"glue": _glue_setup, "e2e": _e2e_setup, "commonsense": _commonsense_setup, "instruction": _instruction_setup}


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
    from kasa_peft.layer import SUPPORTED_LAYER_TYPES, weight_matrix
    from kasa_peft.targeting import name_matches

    for name, module in model.named_modules():
        if isinstance(module, SUPPORTED_LAYER_TYPES) and (targets == "all-linear" or name_matches(name, targets)):
            values = torch.linalg.svdvals(weight_matrix(module).detach().double()).tolist()
            return {"module": name, "singular_values": values, "r": r}
    return None


def _calibration_batches(config: RunConfig, setup: TaskSetup, encode, tokenizer) -> list[dict] | None:
    """The first ``calibration_examples`` training examples as one collated batch, for KaSA's truncation guard."""
    from kasa_peft import KasaConfig

    guard = config.truncation_guard or KasaConfig.__dataclass_fields__["truncation_guard"].default
    if config.method != "kasa" or (guard == "off" and config.truncation_basis == "weight") or config.calibration_examples <= 0:
        return None
    examples = encode(setup.train_items[: config.calibration_examples], tokenizer)
    return [dict(setup.collator_factory(tokenizer)(examples))]


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
    holder: dict[str, Any] = {}
    setup = FAMILY_SETUPS[config.family](config, holder)  # data first: bad data fails before any model load
    loaded = load_model(config.model, setup.kind, num_labels=setup.num_labels, quantize=config.quantize)
    tokenizer = loaded.tokenizer
    targets = config.target_modules or _default_targets(loaded.model)
    spectrum = _spectrum(loaded.model, targets, config.r)
    settings = AdapterSettings(
        r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=targets,
        modules_to_save=_modules_to_save(loaded.model, setup.kind), beta=config.beta, gamma=config.gamma,
        truncation_guard=config.truncation_guard, truncation_basis=config.truncation_basis,
        calibration_batches=_calibration_batches(config, setup, holder["encode"], tokenizer),
    )
    set_seed(config.seed)  # adapter init independent of how much randomness model loading consumed
    prepared = prepare_model(loaded.model, config.method, settings)
    model = prepared.model
    if settings.calibration_batches is not None:  # what the truncation did, for `kasa report`'s per-layer plot
        report = model.truncation_report(settings.calibration_batches)
        atomic_write_text(run_dir / "truncation_report.json", json.dumps(report.to_dict(), indent=2))
    config_record = {**config.to_dict(), "resolved_target_modules": targets, "modules_to_save": settings.modules_to_save,
                     "model_info": describe(loaded), "kasa_peft_version": kasa_peft.__version__,
                     "torch_version": torch.__version__}
    atomic_write_text(run_dir / "config.json", json.dumps(config_record, indent=2, default=str))

    encode = holder["encode"]
    train_dataset = ListDataset(encode(setup.train_items, tokenizer))
    eval_dataset = ListDataset(encode(setup.eval_items, tokenizer)) if setup.eval_items is not None else None
    metrics_path = run_dir / "metrics.jsonl"
    if checkpoint is not None:
        _truncate_metrics_log(metrics_path, int(checkpoint.name.split("-")[-1]))
    else:
        metrics_path.unlink(missing_ok=True)

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
        eval_strategy="epoch" if setup.eval_during_training else "no",
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
        save_only_model=False,
    )
    steps_per_epoch = math.ceil(len(train_dataset) / (config.batch_size * config.gradient_accumulation_steps * max(1, args.world_size)))
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(steps_per_epoch * config.epochs)
    args.warmup_steps = int(config.warmup_ratio * total_steps)
    trainer = prepared.trainer_class(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=setup.collator_factory(tokenizer), compute_metrics=setup.compute_metrics,
        callbacks=[MetricsLogger(metrics_path)],
    )
    if prepared.regularizer is not None:
        trainer.regularizer = prepared.regularizer
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_runtime = time.perf_counter() - started

    started = time.perf_counter()
    evals = _eval_history(metrics_path)
    if setup.eval_during_training and (not evals or evals[-1]["step"] != trainer.state.global_step):
        trainer.evaluate()
        evals = _eval_history(metrics_path)
    if setup.eval_during_training:
        bookkeeping = {"runtime", "samples_per_second", "steps_per_second"}
        strip = lambda record: {k[5:]: v for k, v in record.items()
                                if k.startswith("eval_") and k[5:] not in bookkeeping and isinstance(v, (int, float))}
        final = strip(evals[-1])
        best_record = max(evals, key=lambda rec: rec.get(f"eval_{setup.primary_metric}", float("-inf")))
        best = {**strip(best_record), "epoch": best_record.get("epoch")}
    else:
        final = setup.evaluate(model, tokenizer, config, run_dir) if trainer.is_world_process_zero() else {}
        best = {**final, "epoch": trainer.state.epoch}
    eval_runtime = time.perf_counter() - started

    if not trainer.is_world_process_zero():
        return {}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    _save_final_adapter(model, config.method, run_dir / "adapter")
    analysis = {"spectrum": spectrum, "sigma": kasa_sigma_by_layer(model)}
    atomic_write_text(run_dir / "analysis.json", json.dumps(analysis))
    result = {
        "status": "complete", "task": config.task, "method": config.method, "model": config.model, "seed": config.seed,
        "primary_metric": setup.primary_metric, "final": final, "best": best,
        "trainable_params": trainable, "total_params": total, "global_step": trainer.state.global_step,
        "train_runtime_s": train_runtime, "eval_runtime_s": eval_runtime,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "notes": prepared.notes + ([f"learning rate {config.full_learning_rate} for full fine-tuning"] if config.method == "full" else []),
    }
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2))
    return result


def _eval_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [rec for rec in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if rec["kind"] == "eval"]


def _save_final_adapter(model: torch.nn.Module, method: str, path: Path) -> None:
    if method == "full":
        return  # a full copy of the model is the checkpoint; not duplicated here
    model.save_pretrained(str(path))
