"""Alpaca instruction data (Taori et al., 2023) with the Stanford Alpaca prompt template.

``shared/data/instruction/alpaca/alpaca_5000.json`` is a 5,000-example subset of ``alpaca_data.json`` (a JSON list of
``{"instruction", "input", "output"}``; 1,943 items have an input). Each item becomes ``{"prompt", "target"}`` with the
prompt from ``PROMPT_DICT`` of ``tatsu-lab/stanford_alpaca`` ``train.py`` and the output as the target, concatenated
with nothing in between (``prompt + output + eos``, loss on the output), as that script trains. An item uses the
with-input template exactly when its ``input`` is not the empty string (the script's test).
"""

from __future__ import annotations

import json
from pathlib import Path

from .common import DataError, require_file, resolve_data_dir

ALPACA_FILE = "instruction/alpaca/alpaca_5000.json"

# Stanford Alpaca's PROMPT_DICT, written from memory of train.py (a third-party copy found in the code index agrees
# character for character). The prompt ends at "### Response:"; the response follows without a newline.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the Alpaca field name
    """The Stanford Alpaca prompt for one item (with-input variant iff ``input != ""``)."""
    if input != "":
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _item(record, path: Path, index: int) -> dict:
    where = f"{path}: item {index}"
    if not isinstance(record, dict):
        raise DataError(f"{where} is a {type(record).__name__}; expected an object with instruction, input, output")
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where} has no string {key!r}; Alpaca items are {{instruction, input, output}}")
    input_text = record.get("input", "")
    if not isinstance(input_text, str):
        raise DataError(f"{where}: 'input' must be a string (use \"\" for none)")
    return {"prompt": alpaca_prompt(record["instruction"], input_text), "target": record["output"]}


def load_alpaca_file(path: str | Path, limit: int | None = None) -> list[dict]:
    """``{"prompt", "target"}`` items of an Alpaca-format JSON list (``alpaca_data.json`` or a subset)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Alpaca data file not found: {path}")
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; expected an Alpaca JSON list of {{instruction, input, output}}") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON (line {error.lineno}: {error.msg}); expected an Alpaca JSON list") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON list of {{instruction, input, output}} items")
    items = [_item(record, path, index) for index, record in enumerate(records)]
    return items[:limit] if limit else items


def load_alpaca(data_dir=None, limit: int | None = None) -> list[dict]:
    """The Alpaca subset under the data root (``instruction/alpaca/alpaca_5000.json``)."""
    return load_alpaca_file(require_file(resolve_data_dir(data_dir), ALPACA_FILE, "Alpaca instruction data"), limit)
