"""E2E NLG (Novikova et al., 2017): data-to-text from restaurant meaning representations (MRs).

Prompts use the linearisation of the LoRA / Prefix-Tuning / KaSA line of work (``lora_format/valid.txt``):
``name : The Vaults | Type : pub | price : more than £ 30 ||`` — keys eatType→Type, priceRange→price,
familyFriendly→family friendly, values tokenised like that file. Targets are the original (untokenised)
references, because the official scorer tokenises hypotheses and references itself.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from kasa_peft.checkpoint import atomic_write_text

from .common import DataError, require_file, resolve_data_dir

_KEY_NAMES = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}
_SLOT = re.compile(r"\s*([^\[,]+)\[([^\]]*)\]")
_SPLIT_FILES = {"train": "trainset.csv", "validation": "devset.csv", "test": "testset.csv"}
PROMPT_SEPARATOR = " ||"


def _tokenise_value(value: str) -> str:
    return " ".join(re.sub(r"([£\-,.'])", r" \1 ", value).split())


def format_mr(mr: str) -> str:
    """``name[Alimentum], familyFriendly[no]`` → ``name : Alimentum | family friendly : no``."""
    slots = _SLOT.findall(mr)
    if not slots:
        raise DataError(f"not an E2E meaning representation: {mr!r}")
    return " | ".join(f"{_KEY_NAMES.get(key.strip(), key.strip())} : {_tokenise_value(value)}" for key, value in slots)


def _read(split: str, data_dir) -> list[tuple[str, str | None]]:
    if split not in _SPLIT_FILES:
        raise DataError(f"E2E split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    path = require_file(resolve_data_dir(data_dir), f"e2e/{_SPLIT_FILES[split]}", f"E2E {split}")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        if "mr" not in header:
            raise DataError(f"{path}: header must start with 'mr' (found {header})")
        mr_col, ref_col = header.index("mr"), header.index("ref") if "ref" in header else None
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(mr_col, ref_col or 0):
                raise DataError(f"{path}:{line}: expected columns {header}, found {len(row)}")
            rows.append((row[mr_col], row[ref_col] if ref_col is not None else None))
    return rows


def load_e2e(split: str, data_dir=None, limit: int | None = None) -> list[dict]:
    """Training pairs ``{"mr", "prompt", "target"}``, one per reference."""
    examples = [{"mr": mr, "prompt": format_mr(mr) + PROMPT_SEPARATOR, "target": ref} for mr, ref in _read(split, data_dir) if ref]
    return examples[:limit] if limit else examples


def load_e2e_grouped(split: str, data_dir=None, limit: int | None = None) -> list[tuple[str, list[str]]]:
    """``(prompt, references)`` per distinct MR in order of first appearance (the official grouping).

    The test split here has MRs only (its references are not distributed with this data): reference lists are empty.
    """
    groups: dict[str, list[str]] = {}
    for mr, ref in _read(split, data_dir):
        groups.setdefault(mr, [])
        if ref:
            groups[mr].append(ref)
    items = [(format_mr(mr) + PROMPT_SEPARATOR, refs) for mr, refs in groups.items()]
    return items[:limit] if limit else items


def write_e2e_reference_file(groups: list[list[str]], path: str | Path) -> None:
    """The e2e-metrics reference format: references of one MR on consecutive lines, a blank line between MRs."""
    atomic_write_text(path, "\n\n".join("\n".join(group) for group in groups) + "\n")


def write_hypothesis_file(lines: list[str], path: str | Path) -> None:
    atomic_write_text(path, "".join(line.replace("\n", " ") + "\n" for line in lines))
