"""Commonsense reasoning, the 8 tasks of LLM-Adapters (Hu et al., 2023), in their prompt and answer format.

Files follow LLM-Adapters' JSON lists of ``{"instruction", "input", "output", "answer"}``. Two are converted here
into that format: HellaSwag (a bz2 text dump of the labelled validation set, 6 lines per item) and the SIQA train
set (jsonl + a labels file). The prompt template and the answer extraction follow LLM-Adapters'
``finetune.py`` / ``commonsense_evaluate.py``.

Training mix: LLM-Adapters' ``commonsense_170k`` is not available offline, so the mix is built from the train files
that are (``TRAINING_MIX_TASKS``); PIQA, WinoGrande and HellaSwag have no train split here and are evaluated
zero-shot from that mix.
"""

from __future__ import annotations

import bz2
import json
import random
import re
from pathlib import Path

from .common import DataError, check_label, require_file, resolve_data_dir

COMMONSENSE_TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
TRAINING_MIX_TASKS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa", "social_i_qa")
_ANSWER_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}


def generate_prompt(instruction: str, input: str | None = None, output: str = "") -> str:
    """LLM-Adapters' Alpaca-style template (``output`` empty for evaluation prompts)."""
    if input:
        return (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        f"### Instruction:\n{instruction}\n\n### Response:\n{output}"
    )


def extract_answer(task: str, text: str) -> str:
    """The first answer token LLM-Adapters' regex finds in a generation ('' if none)."""
    if task not in _ANSWER_PATTERNS:
        raise DataError(f"unknown commonsense task {task!r}; choose from {list(COMMONSENSE_TASKS)}")
    found = re.findall(_ANSWER_PATTERNS[task], text.strip())
    return found[0] if found else ""


def _load_json_list(path: Path, task: str) -> list[dict]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}); expected LLM-Adapters' JSON list") from None
    allowed = set(re.findall(r"\w+", _ANSWER_PATTERNS[task].replace("|", " ")))
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict) or "instruction" not in item or "answer" not in item:
            raise DataError(f"{path}: item {number} lacks 'instruction'/'answer' (LLM-Adapters format)")
        check_label(item["answer"], allowed, path, number)
        item.setdefault("input", "")
        item.setdefault("output", f"the correct answer is {item['answer']}")
    return items


def _multiple_choice_item(lead: str, options: list[str], word: str, gold: int) -> dict:
    """An item in LLM-Adapters' multiple-choice wording: lead, blank line, "Answer1: … Answer2: …", blank line, format."""
    listed = " ".join(f"{word.capitalize()}{k}: {option}" for k, option in enumerate(options, start=1))
    formats = "/".join(f"{word}{k}" for k in range(1, len(options) + 1))
    answer = f"{word}{gold + 1}"
    instruction = f"{lead}\n\n{listed}\n\nAnswer format: {formats}"
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def _load_hellaswag(root: Path | None) -> list[dict]:
    path = require_file(root, "commonsense/hellaswag/hellaswag_val_full.txt.bz2", "HellaSwag")
    lines = bz2.open(path, "rt", encoding="utf-8").read().splitlines()
    if len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings per item)")
    items = []
    for start in range(0, len(lines), 6):
        context, label, *endings = lines[start : start + 6]
        if not label.strip().isdigit():
            raise DataError(f"{path}:{start + 2}: gold label {label!r} is not 0-3")
        gold = check_label(int(label), {0, 1, 2, 3}, path, start + 2)
        lead = f"Please choose the correct ending to complete the given sentence: {context.strip()}"
        items.append(_multiple_choice_item(lead, [ending.strip() for ending in endings], "ending", gold))
    return items


def _load_siqa_train(root: Path | None) -> list[dict]:
    questions = require_file(root, "commonsense/social_i_qa/train.jsonl", "SIQA train")
    labels_path = require_file(root, "commonsense/social_i_qa/train-labels.lst", "SIQA train labels")
    rows = [json.loads(line) for line in questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
    if len(rows) != len(labels):
        raise DataError(f"{questions} has {len(rows)} questions but {labels_path} has {len(labels)} labels")
    items = []
    for number, (row, label) in enumerate(zip(rows, labels), start=1):
        check_label(label, {"1", "2", "3"}, labels_path, number)
        lead = f"Please choose the correct answer to the question: {row['context']} {row['question']}"
        items.append(_multiple_choice_item(lead, [row["answerA"], row["answerB"], row["answerC"]], "answer", int(label) - 1))
    return items


def load_commonsense(task: str, split: str, data_dir=None, limit: int | None = None) -> list[dict]:
    """Items of one task; ``split`` is 'train' or 'test' (HellaSwag: its labelled validation set serves as test)."""
    if task not in COMMONSENSE_TASKS:
        raise DataError(f"unknown commonsense task {task!r}; choose from {list(COMMONSENSE_TASKS)}")
    root = resolve_data_dir(data_dir)
    if task == "hellaswag":
        if split != "test":
            raise DataError("HellaSwag has no train split here; it is evaluated only")
        items = _load_hellaswag(root)
    elif task == "social_i_qa" and split == "train":
        items = _load_siqa_train(root)
    else:
        if split == "train" and task not in TRAINING_MIX_TASKS:
            raise DataError(f"{task} has no train split here; train on the mix ({', '.join(TRAINING_MIX_TASKS)})")
        items = _load_json_list(require_file(root, f"commonsense/{task}/{split}.json", f"{task} {split}"), task)
    return items[:limit] if limit else items


def load_commonsense_file(task: str, path: Path) -> list[dict]:
    """A user's labelled file of one task in LLM-Adapters' JSON-list format (``kasa eval --eval-file``)."""
    if task not in COMMONSENSE_TASKS:
        raise DataError(f"unknown commonsense task {task!r}; choose from {list(COMMONSENSE_TASKS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"eval file not found: {path}")
    return _load_json_list(path, task)


def build_commonsense_training_mix(data_dir=None, per_task_limit: int | None = None, seed: int = 0) -> list[dict]:
    """The train files of ``TRAINING_MIX_TASKS`` (at most ``per_task_limit`` each), shuffled with ``seed``."""
    mix = []
    for task in TRAINING_MIX_TASKS:
        mix.extend(load_commonsense(task, "train", data_dir, limit=per_task_limit))
    random.Random(seed).shuffle(mix)
    return mix
