"""Commonsense reasoning as the KaSA authors train it (LLM-Adapters' recipe): prompt, cutoff, ``train_on_inputs``.

Training mix and prompts: :mod:`.commonsense`. ``--task commonsense`` evaluates all eight tasks (accuracy = their
mean); ``--task boolq`` etc. trains on the same mix and evaluates that task only. The mix is LLM-Adapters'
``commonsense_170k`` stand-in described in :mod:`.commonsense` (reported in every run's notes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from kasa_peft.checkpoint import atomic_write_text

from . import commonsense as cs
from .common import cap_items
from .protocol import TaskFamily

if TYPE_CHECKING:  # pragma: no cover
    from ..runconfig import RunConfig


class CommonsenseFamily(TaskFamily):
    name = "commonsense"
    kind = "causal"
    tasks = ("commonsense", *cs.COMMONSENSE_TASKS)
    PRESETS = {
        # quick: RunConfig's small defaults (prompt masked out of the loss, 128-token cutoff), LLM-Adapters' beam 4.
        "quick": {"*": {"num_beams": 4}},
        # paper: the header of juyongjiang/KaSA commonsense_reasoning_logs/train_llama-3-8b-kasa.log (LLM-Adapters'
        # finetune.py), evaluation settings from LLM-Adapters' commomsense_evaluate.py.
        "paper": {
            "*": {
                "r": 32,                    # log: lora_r: 32
                "lora_alpha": 64,           # log: lora_alpha: 64
                "lora_dropout": 0.05,       # log: lora_dropout: 0.05
                "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],  # log: target_modules
                "learning_rate": 3e-4,      # log: learning_rate: 0.0003
                "batch_size": 4,            # log: micro_batch_size: 4 ...
                "gradient_accumulation_steps": 4,  # ... and batch_size: 16 = 4 × 4 accumulated
                "epochs": 3,                # log: num_epochs: 3
                "max_length": 256,          # log: cutoff_len: 256
                "train_on_inputs": True,    # log: train_on_inputs: True
                "warmup_steps": 100,        # LLM-Adapters finetune.py: TrainingArguments(warmup_steps=100)
                "weight_decay": 0.0,        # finetune.py sets none (Trainer default 0)
                "num_beams": 4,             # commomsense_evaluate.py evaluate(num_beams=4)
                "max_new_tokens": 32,       # commomsense_evaluate.py evaluate(max_new_tokens=32)
                # β, γ: not in the log header; kasa-peft's (= PEFT KasaConfig's) defaults.
                "beta": 1e-4,
                "gamma": 1e-3,
            }
        },
    }

    def primary_metric(self, config: "RunConfig") -> str:
        return "accuracy"

    def notes(self, config: "RunConfig") -> list[str]:
        return [f"commonsense: trained on the offline mix of {', '.join(cs.TRAINING_MIX_TASKS)} (commonsense_170k is "
                "not available); PIQA, WinoGrande and HellaSwag are evaluated zero-shot from it"]

    def _eval_tasks(self, config: "RunConfig") -> list[str]:
        return list(cs.COMMONSENSE_TASKS) if config.task == "commonsense" else [config.task]

    def load_train(self, config: "RunConfig") -> list[dict]:
        # Shuffled with the fixed data seed, then capped: every method and run seed trains on the same examples.
        mix = cs.build_commonsense_training_mix(config.data_dir, per_task_limit=None, seed=0)
        return cap_items(mix, config.train_limit)

    def load_eval(self, config: "RunConfig") -> dict[str, list[dict]]:
        return {task: cap_items(cs.load_commonsense(task, "test", config.data_dir), config.eval_limit)
                for task in self._eval_tasks(config)}

    def load_eval_file(self, config: "RunConfig", path: Path) -> dict[str, list[dict]]:
        if config.task == "commonsense":
            raise ValueError("--eval-file needs a single commonsense task: the run's --task is 'commonsense' (all 8)")
        return {config.task: cap_items(cs.load_commonsense_file(config.task, Path(path)), config.eval_limit)}

    def encode(self, items: list[dict], tokenizer, config: "RunConfig") -> list[dict]:
        from ..generation import encode_sft_example

        return [
            encode_sft_example(tokenizer, cs.generate_prompt(item["instruction"], item.get("input")), item["output"],
                               config.max_length, train_on_inputs=config.train_on_inputs)
            for item in items
        ]

    def collator(self, tokenizer) -> Callable:
        from ..generation import SFTCollator

        return SFTCollator(tokenizer.pad_token_id)

    def loss_function(self, config: "RunConfig") -> Callable | None:
        from ..generation import causal_lm_loss

        return causal_lm_loss(config.label_smoothing) if config.label_smoothing else None

    def evaluate(self, model, tokenizer, config: "RunConfig", eval_data: Any, out_dir: Path) -> dict[str, float]:
        from ..generation import decoding_options, generate_texts

        metrics: dict[str, float] = {}
        records = []
        for task, items in eval_data.items():
            prompts = [cs.generate_prompt(item["instruction"], item.get("input")) for item in items]
            outputs = generate_texts(model, tokenizer, prompts, config.eval_batch_size, description=f"{task} decoding",
                                     **decoding_options(config))
            correct = 0
            for item, output in zip(items, outputs):
                predicted = cs.extract_answer(task, output)
                correct += int(predicted == item["answer"])
                records.append({"task": task, "output": output, "predicted": predicted, "answer": item["answer"]})
            metrics[f"{task}_accuracy"] = correct / max(1, len(items))
        metrics["accuracy"] = float(np.mean([metrics[f"{task}_accuracy"] for task in eval_data]))
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "commonsense_outputs.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        return metrics


FAMILY = CommonsenseFamily()
