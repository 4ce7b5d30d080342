"""GLUE as the KaSA paper runs it: sequence classification, dev set evaluated every epoch, best epoch reported.

Data come from :mod:`.glue` (local files or the Hub); held-out labelled files from
:func:`kasa_peft.experiments.eval_files.load_glue_eval_file`. Metrics are GLUE's (:mod:`..metrics.glue`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from . import glue
from .common import cap_items
from .protocol import TaskFamily

if TYPE_CHECKING:  # pragma: no cover
    from ..runconfig import RunConfig


def _paper(batch_size: int, epochs: int, learning_rate: float, beta: float, gamma: float) -> dict[str, Any]:
    return {"batch_size": batch_size, "epochs": epochs, "learning_rate": learning_rate, "beta": beta, "gamma": gamma}


class GlueFamily(TaskFamily):
    name = "glue"
    kind = "classification"
    tasks = tuple(glue.GLUE_TASKS)
    eval_during_training = True
    PRESETS = {
        # quick: RunConfig's own defaults (kasa-peft's small CPU settings: lr 5e-4, batch 16, 1 epoch, max_length 128,
        # r 8, α 16, q/v, β 1e-4, γ 1e-3, 6 % warm-up). Not a paper's protocol.
        "quick": {"*": {}},
        # paper: the headers of the authors' RoBERTa-base logs, juyongjiang/KaSA logs/roberta-base/*.log (the runs
        # behind the paper's GLUE table; where runs/*.sh disagrees, the logs win). Common to all six logs:
        "paper": {
            "*": {
                "r": 8,                 # logs: lora_r: 8
                "lora_alpha": 16,       # logs: lora_alpha: 16
                "lora_dropout": 0.0,    # logs: lora_dropout: 0.0
                "target_modules": None,  # logs: query/value adapted (lora_A on attention.self.query/value) → q/v resolved per model
                "max_length": 512,      # logs: max_length: 512
                "weight_decay": 0.0,    # logs: weight_decay: 0.0
                "warmup_ratio": 0.06,   # logs: warmup_ratio: 0.06 (linear schedule, AdamW: main.py)
                "warmup_steps": 0,
                "gradient_accumulation_steps": 1,  # main.py: no accumulation
                "label_smoothing": 0.0,
            },
            # per task: batch size / epochs / lr (module_lr = head_lr) / beta / gamma, from each log's header
            "cola": _paper(32, 100, 4e-4, 1e-4, 1e-3),   # roberta-base_cola_bs_32_..._lr_4e-4_beta_0.0001_gemma_0.001 log
            "sst2": _paper(128, 100, 5e-4, 1e-4, 1e-3),  # roberta-base_sst2_bs_128_..._lr_5e-4_beta_0.0001_gemma_0.001 log
            "mrpc": _paper(32, 100, 4e-4, 1e-1, 1e-3),   # roberta-base_mrpc_bs_32_..._lr_4e-4_beta_0.1_gemma_0.001 log
            "qnli": _paper(32, 10, 4e-4, 1e-2, 1e-5),    # roberta-base_qnli_bs_32_..._lr_4e-4_beta_0.01_gemma_0.00001 log
            "rte": _paper(32, 100, 4e-4, 1e-2, 1e-5),    # roberta-base_rte_bs_32_..._lr_4e-4_beta_0.01_gemma_0.00001 log
            "stsb": _paper(32, 40, 3e-4, 1e-4, 1e-5),    # roberta-base_stsb_bs_32_..._lr_3e-4_beta_0.0001_gemma_0.00001 log
        },
    }

    def num_labels(self, task: str) -> int:
        return glue.GLUE_TASKS[task].num_labels

    def primary_metric(self, config: "RunConfig") -> str:
        from ..metrics.glue import PRIMARY_METRIC

        return PRIMARY_METRIC[config.task]

    def notes(self, config: "RunConfig") -> list[str]:
        return [glue.QNLI_SPLIT_NOTE] if config.task == "qnli" and not config.demo_data else []

    # ------------------------------------------------------------------ data
    def _load(self, config: "RunConfig", split: str, limit: int | None) -> list[dict]:
        if config.demo_data:
            if config.task != "sst2":
                raise ValueError("--demo-data ships SST-2 only; use --task sst2 or pass --data-dir.")
            return cap_items(glue.load_demo_sst2(split), limit)
        return cap_items(glue.load_glue(config.task, split, data_dir=config.data_dir), limit)

    def load_train(self, config: "RunConfig") -> list[dict]:
        return self._load(config, "train", config.train_limit)

    def load_eval(self, config: "RunConfig") -> list[dict]:
        return self._load(config, "validation", config.eval_limit)

    def load_eval_file(self, config: "RunConfig", path: Path) -> list[dict]:
        from ..eval_files import load_glue_eval_file

        return cap_items(load_glue_eval_file(config.task, path), config.eval_limit)

    def encode(self, items: list[dict], tokenizer, config: "RunConfig") -> list[dict]:
        regression = glue.GLUE_TASKS[config.task].is_regression
        encoded = []
        for item in items:
            features = tokenizer(item["sentence1"], item.get("sentence2"), truncation=True, max_length=config.max_length)
            features["labels"] = float(item["label"]) if regression else int(item["label"])
            encoded.append(dict(features))
        return encoded

    def collator(self, tokenizer) -> Callable:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    # ------------------------------------------------------------------ training hooks
    def trainer_eval_items(self, eval_data: Any) -> list[dict]:
        return eval_data

    def compute_metrics(self, config: "RunConfig") -> Callable:
        from ..metrics.glue import compute_glue_metrics

        task = config.task
        regression = glue.GLUE_TASKS[task].is_regression

        def compute(eval_pred) -> dict[str, float]:
            logits, labels = eval_pred
            logits = logits[0] if isinstance(logits, tuple) else logits
            predictions = logits.squeeze(-1) if regression else np.argmax(logits, axis=-1)
            return compute_glue_metrics(task, predictions, labels)

        return compute

    def loss_function(self, config: "RunConfig") -> Callable | None:
        if not config.label_smoothing:
            return None
        if glue.GLUE_TASKS[config.task].is_regression:
            raise ValueError("label_smoothing applies to classification; STS-B is a regression task (set it to 0).")
        epsilon = config.label_smoothing

        def smoothed_cross_entropy(outputs, labels, num_items_in_batch=None):
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            total = torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=epsilon, reduction="sum")
            return total / (num_items_in_batch if num_items_in_batch else labels.numel())

        return smoothed_cross_entropy

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model, tokenizer, config: "RunConfig", eval_data: list[dict], out_dir: Path) -> dict[str, float]:
        """Batched forward passes over ``eval_data`` → the task's GLUE metrics (as the Trainer's per-epoch ones) and ``loss``."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        features = self.encode(eval_data, tokenizer, config)
        collate = self.collator(tokenizer)
        logits, labels, loss_sum = [], [], 0.0
        try:
            for start in range(0, len(features), config.eval_batch_size):
                batch = collate([dict(item) for item in features[start : start + config.eval_batch_size]])
                labels.append(batch["labels"].numpy())
                outputs = model(**{key: value.to(device) for key, value in batch.items()})
                loss_sum += float(outputs.loss) * len(batch["labels"])  # the model's own loss, per-example mean
                logits.append(outputs.logits.float().cpu().numpy())
        finally:
            model.train(was_training)
        metrics = self.compute_metrics(config)((np.concatenate(logits), np.concatenate(labels)))
        return {**metrics, "loss": loss_sum / max(1, len(features))}


FAMILY = GlueFamily()
