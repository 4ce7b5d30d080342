"""Alpaca items with the Stanford Alpaca template: exact prompt text, both variants, the shared subset, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kasa_peft.experiments.tasks import alpaca
from kasa_peft.experiments.tasks.common import DataError

_HERE = Path(__file__).resolve()
DATA = next((p for p in (_HERE.parents[2].parent / "shared" / "data", _HERE.parents[4] / "shared" / "data") if p.is_dir()),
            _HERE.parents[2].parent / "shared" / "data")
needs_data = pytest.mark.skipif(not (DATA / alpaca.ALPACA_FILE).is_file(), reason="../shared/data is not present")


def test_prompt_texts_are_stanford_alpacas():
    assert alpaca.alpaca_prompt("Add the numbers.", "2, 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2, 3\n\n### Response:")
    assert alpaca.alpaca_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a colour.\n\n### Response:")
    # the script's test is `input != ""`: whitespace counts as an input
    assert "### Input:\n \n\n" in alpaca.alpaca_prompt("x", " ")


def test_file_items_become_prompt_target_pairs(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi!"},
                                {"instruction": "Translate.", "input": "chat", "output": "cat"}]), encoding="utf-8")
    items = alpaca.load_alpaca_file(path)
    assert items[0] == {"prompt": alpaca.PROMPT_NO_INPUT.format(instruction="Say hi."), "target": "Hi!"}
    assert items[1]["prompt"].endswith("### Input:\nchat\n\n### Response:") and items[1]["target"] == "cat"
    assert alpaca.load_alpaca_file(path, limit=1) == items[:1]


@needs_data
def test_shared_subset_loads_with_both_variants():
    items = alpaca.load_alpaca(DATA)
    assert len(items) == 5000
    assert sum("### Input:" in item["prompt"] for item in items) == 1943  # the MANIFEST's count of non-empty inputs
    assert all(item["prompt"].endswith("### Response:") for item in items)


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00", "not UTF-8"),
    (b"{not json", "not valid JSON"),
    (b'{"instruction": "x"}', "non-empty JSON list"),
    (b"[]", "non-empty JSON list"),
    (b'[{"instruction": "x", "input": ""}]', "item 0 has no string 'output'"),
    (b'[{"instruction": "x", "input": null, "output": "y"}]', "'input' must be a string"),
    (b'["just text"]', "item 0 is a str"),
])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "alpaca.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        alpaca.load_alpaca_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_data_dir_names_the_file(tmp_path):
    with pytest.raises(DataError, match="alpaca_5000.json"):
        alpaca.load_alpaca(tmp_path)
