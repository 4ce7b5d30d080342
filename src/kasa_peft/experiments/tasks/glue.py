"""GLUE loaders (CoLA, SST-2, MRPC, STS-B, RTE, QNLI) for the local layout of ``shared/data/glue`` or the Hub.

Every example is ``{"sentence1": str, "sentence2": str | None, "label": int | float}``; splits are ``train`` and
``validation`` (GLUE dev; labelled GLUE test sets are not public). QNLI's 105k-row train file is not available
offline, so for QNLI both splits come from the dev file: a fixed, seeded 80/20 split by row index
(``QNLI_SPLIT_NOTE``) — report such numbers as "QNLI dev-split", not as GLUE QNLI.
"""

from __future__ import annotations

import csv
import io
import os
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .common import DataError, check_label, require_file, resolve_data_dir

QNLI_SPLIT_SEED = 0
QNLI_TRAIN_FRACTION = 0.8
QNLI_SPLIT_NOTE = (
    "QNLI: only the dev set (5,463 rows) is available offline; train = a seeded (seed 0) 80% of its rows, "
    "validation = the other 20%. Not comparable with GLUE QNLI numbers."
)


@dataclass(frozen=True)
class GlueTask:
    name: str
    num_labels: int  # 1 = regression
    label_names: tuple[str, ...]

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


GLUE_TASKS = {
    "cola": GlueTask("cola", 2, ("unacceptable", "acceptable")),
    "sst2": GlueTask("sst2", 2, ("negative", "positive")),
    "mrpc": GlueTask("mrpc", 2, ("not_equivalent", "equivalent")),
    "stsb": GlueTask("stsb", 1, ()),
    "rte": GlueTask("rte", 2, ("entailment", "not_entailment")),
    "qnli": GlueTask("qnli", 2, ("entailment", "not_entailment")),
}


def _read_text(path: Path) -> str:
    """The file as text; a binary or non-UTF-8 file is a :class:`DataError` naming the file and line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
                        "is this the right file? GLUE TSVs are UTF-8") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise DataError(f"{path}:{line}: contains NUL bytes, so it is a binary file, not a TSV; is this the right file?")
    return text


def _rows(path: Path, header: bool) -> list[tuple[int, list[str]]]:
    # QUOTE_NONE: GLUE TSVs contain bare quotes inside sentences (RTE, SST-2); csv quoting would merge rows.
    rows = list(csv.reader(io.StringIO(_read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    start = 1 if header else 0
    return [(number + 1, row) for number, row in enumerate(rows) if number >= start and any(cell.strip() for cell in row)]


def _field(row: list[str], index: int, path: Path, line: int, expected: str) -> str:
    if index >= len(row):
        raise DataError(f"{path}:{line}: expected {expected} in column {index + 1}, found only {len(row)} columns")
    return row[index]


def _int_label(text: str, allowed: set[int], path: Path, line: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"{path}:{line}: label {text!r} is not an integer (allowed {sorted(allowed)})") from None
    return check_label(value, allowed, path, line)


def _read_cola(path: Path) -> list[dict]:
    return [
        {"sentence1": _field(row, 3, path, line, "the sentence"), "sentence2": None,
         "label": _int_label(_field(row, 1, path, line, "the label"), {0, 1}, path, line)}
        for line, row in _rows(path, header=False)
    ]


def _read_headed(path: Path, text_columns: tuple[str, ...], label_column: str, parse_label) -> list[dict]:
    rows = _rows(path, header=False)
    if not rows:
        raise DataError(f"{path}: file is empty")
    header = [cell.strip() for cell in rows[0][1]]
    missing = [c for c in (*text_columns, label_column) if c not in header]
    if missing:
        raise DataError(f"{path}: header lacks columns {missing} (found {header})")
    index = {name: header.index(name) for name in header}
    examples = []
    for line, row in rows[1:]:
        texts = [_field(row, index[c], path, line, c) for c in text_columns]
        label = parse_label(_field(row, index[label_column], path, line, label_column), path, line)
        examples.append({"sentence1": texts[0], "sentence2": texts[1] if len(texts) > 1 else None, "label": label})
    return examples


def _binary(text: str, path: Path, line: int) -> int:
    return _int_label(text, {0, 1}, path, line)


def _score(text: str, path: Path, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}:{line}: STS-B score {text!r} is not a number") from None
    if not 0.0 <= value <= 5.0:
        raise DataError(f"{path}:{line}: STS-B score {value} is outside [0, 5]")
    return value


def _qnli_label(text: str, path: Path, line: int) -> int:
    names = GLUE_TASKS["qnli"].label_names
    return names.index(check_label(text, set(names), path, line))


def _local(task: str, split: str, root: Path | None) -> list[dict]:
    what = f"GLUE {task} {split}"
    if task == "cola":
        if split == "train":
            return _read_cola(require_file(root, "glue/CoLA/in_domain_train.tsv", what))
        return _read_cola(require_file(root, "glue/CoLA/in_domain_dev.tsv", what)) + _read_cola(
            require_file(root, "glue/CoLA/out_of_domain_dev.tsv", what))
    if task == "sst2":
        name = "train_full.tsv" if split == "train" else "dev.tsv"
        return _read_headed(require_file(root, f"glue/SST-2/{name}", what), ("sentence",), "label", _binary)
    if task == "mrpc":
        path = require_file(root, f"glue/MRPC/{'train' if split == 'train' else 'dev'}.tsv", what)
        return _read_headed(path, ("#1 String", "#2 String"), "Quality", _binary)
    if task == "stsb":
        path = require_file(root, f"glue/STS-B/{'train' if split == 'train' else 'dev'}.tsv", what)
        return _read_headed(path, ("sentence1", "sentence2"), "score", _score)
    if task == "rte":
        path = require_file(root, f"glue/RTE/{'train' if split == 'train' else 'dev'}.tsv", what)
        return _read_headed(path, ("sentence1", "sentence2"), "label", _binary)  # 0 = entailment (HF export)
    if task == "qnli":
        rows = _read_headed(require_file(root, "glue/QNLI/dev.tsv", what), ("question", "sentence"), "label", _qnli_label)
        order = list(range(len(rows)))
        random.Random(QNLI_SPLIT_SEED).shuffle(order)
        cut = int(QNLI_TRAIN_FRACTION * len(rows))
        chosen = sorted(order[:cut]) if split == "train" else sorted(order[cut:])
        return [rows[i] for i in chosen]
    raise DataError(f"unknown GLUE task {task!r}; choose from {sorted(GLUE_TASKS)}")


def _from_hub(task: str, split: str) -> list[dict]:
    """GLUE from the Hugging Face Hub (``nyu-mll/glue``): needs the optional ``datasets`` package (``kasa-peft[hub]``)
    and, unless the split is already in the local ``datasets`` cache, internet with ``HF_HUB_OFFLINE=0``."""
    import importlib.util

    local = "pass --data-dir (or set KASA_DATA_DIR) to a local copy laid out like shared/data, or --demo-data for SST-2"
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"GLUE {task}: no --data-dir given, and loading GLUE from the Hub needs the optional package "
                        f"'datasets': pip install 'kasa-peft[hub]'; or {local}")
    try:
        from datasets import load_dataset

        data = load_dataset("nyu-mll/glue", task, split=split)
    except Exception as error:  # noqa: BLE001 - any hub failure becomes the same one-line advice
        offline = os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = ("the Hub is switched off (HF_DATASETS_OFFLINE=1, the kasa default; set HF_HUB_OFFLINE=0 "
               "where there is internet)" if offline else f"the Hub is unreachable ({error.__class__.__name__})")
        raise DataError(f"GLUE {task} {split}: no --data-dir given and {why}; {local}") from None
    first, second = {"cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
                     "stsb": ("sentence1", "sentence2"), "rte": ("sentence1", "sentence2"), "qnli": ("question", "sentence")}[task]
    return [{"sentence1": row[first], "sentence2": row[second] if second else None, "label": row["label"]} for row in data]


def load_glue(task: str, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """Examples of a GLUE task split from ``data_dir`` (or ``$KASA_DATA_DIR``), else from the Hub."""
    if task not in GLUE_TASKS:
        raise DataError(f"unknown GLUE task {task!r}; choose from {sorted(GLUE_TASKS)}")
    if split not in ("train", "validation"):
        raise DataError(f"GLUE split must be 'train' or 'validation', got {split!r}")
    root = resolve_data_dir(data_dir)
    examples = _local(task, split, root) if root is not None else _from_hub(task, split)
    return examples[:limit] if limit else examples


def load_demo_sst2(split: str, limit: int | None = None) -> list[dict]:
    """The SST-2 subset shipped in ``kasa_peft/experiments/demo_data`` (see its README for provenance)."""
    name = {"train": "sst2_train.tsv", "validation": "sst2_dev.tsv"}.get(split)
    if name is None:
        raise DataError(f"demo SST-2 split must be 'train' or 'validation', got {split!r}")
    resource = resources.files("kasa_peft.experiments") / "demo_data" / name
    with resources.as_file(resource) as path:
        examples = _read_headed(Path(path), ("sentence",), "label", _binary)
    return examples[:limit] if limit else examples
