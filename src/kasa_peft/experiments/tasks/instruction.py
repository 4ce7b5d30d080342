"""Instruction following: SFT data in chat form, and MT-Bench (Zheng et al., 2023) questions and references.

Training data for the instruction family is the Alpaca subset (:mod:`.alpaca`); users with their own chat data
can read a JSON/JSONL file with ``load_instruction_file`` (``messages`` or ``instruction``/``input``/``output``
records). MT-Bench answering and judging is :mod:`kasa_peft.experiments.mt_bench`; FastChat's
GPT-4 reference answers exist for the math, reasoning and coding categories only.
"""

from __future__ import annotations

import json
from pathlib import Path

from .common import DataError, require_file, resolve_data_dir


def _jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return records


def load_mt_bench_questions(data_dir=None) -> list[dict]:
    path = require_file(resolve_data_dir(data_dir), "instruction/mt_bench/question.jsonl", "MT-Bench questions")
    questions = _jsonl(path)
    for number, record in enumerate(questions, start=1):
        if not record.get("turns"):
            raise DataError(f"{path}:{number}: question has no 'turns'")
    return questions


def load_mt_bench_references(data_dir=None) -> dict[int, list[str]]:
    path = require_file(resolve_data_dir(data_dir), "instruction/mt_bench/gpt-4.jsonl", "MT-Bench references")
    return {record["question_id"]: record["choices"][0]["turns"] for record in _jsonl(path)}


def _to_messages(record: dict, path: Path, number: int) -> dict:
    if "messages" in record:
        return {"messages": record["messages"]}
    if "instruction" in record and "output" in record:
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]}
    raise DataError(f"{path}:{number}: record needs 'messages' or 'instruction'+'output'")


def load_instruction_file(path: str | Path) -> list[dict]:
    """A user SFT file: a JSON list or JSONL of ``messages`` or ``instruction``/``input``/``output`` records."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"instruction data file not found: {path}")
    records = _jsonl(path) if path.suffix == ".jsonl" else json.loads(path.read_text(encoding="utf-8"))
    return [_to_messages(record, path, number) for number, record in enumerate(records, start=1)]
