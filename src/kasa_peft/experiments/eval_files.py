"""Held-out evaluation files for ``kasa eval RUN --eval-file PATH``: labelled GLUE TSVs and E2E references.

GLUE: a file in the task's dev-file layout, recognised from its header or its columns, gives the same examples as
``tasks.glue.load_glue`` (``{"sentence1", "sentence2", "label"}``; RTE/QNLI labels 0 = entailment):

==========  =====================================================================================================
task        layouts accepted
==========  =====================================================================================================
sst2        header ``sentence<TAB>label`` (GLUE dev.tsv)
mrpc        header ``Quality  #1 ID  #2 ID  #1 String  #2 String`` (msr_paraphrase_*.txt, GLUE train/dev.tsv)
stsb        GLUE header ``… sentence1  sentence2  score``; or sts-*.tsv, no header: genre, file, year, id, score, s1, s2
cola        no header: source, label (0/1), original mark, sentence (in_domain_dev.tsv, out_of_domain_dev.tsv)
rte, qnli   header with ``sentence1 sentence2 label`` / ``question sentence label``; labels 0/1 or entailment names
==========  =====================================================================================================

E2E: a LoRA-format file (``MR||reference`` lines) or an E2E CSV with references (``mr,ref``: testset_w_refs.csv),
grouped per MR in order of first appearance; CSV references are converted exactly as ``kasa data e2e-lora-format``
converts them, so both layouts give identical groups.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .tasks.common import DataError
from .tasks.e2e_lora_format import SEPARATOR, csv_to_lora_lines, group_by_mr, read_lora_format
from .tasks.glue import GLUE_TASKS


def _check_text_file(path: Path, what: str) -> str:
    """The file's text; a missing, binary or non-UTF-8 file is a one-line error naming it and ``what`` it should be."""
    if not path.is_file():
        raise DataError(f"evaluation file not found: {path}")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise DataError(f"{path}: binary data, not a text file; expected {what}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; expected {what}") from None


def _tsv_rows(text: str) -> list[tuple[int, list[str]]]:
    # QUOTE_NONE: GLUE TSVs carry bare quotes inside sentences; csv quoting would merge rows (as in tasks.glue).
    # StringIO, not splitlines(): only \r and \n end a row (sentences may hold U+2028 or \x85, as csv.reader on a file).
    rows = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    return [(number, row) for number, row in enumerate(rows, start=1) if any(cell.strip() for cell in row)]


def _binary_label(text: str) -> int:
    value = int(text)
    if value not in (0, 1):
        raise ValueError(text)
    return value


def _entailment_label(text: str) -> int:
    # HF exports write 0/1 (0 = entailment); the original GLUE files write the names. -1 (unlabelled) is rejected.
    names = GLUE_TASKS["rte"].label_names
    return names.index(text) if text in names else _binary_label(text)


def _score(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 5.0:
        raise ValueError(text)
    return value


@dataclass(frozen=True)
class _Layout:
    """One TSV layout: named header columns (``header``) or fixed column positions (``positions``, no header)."""

    description: str
    parse_label: Callable[[str], int | float]
    label_meaning: str
    header: tuple[str, ...] | None = None  # (text1[, text2], label) column names
    positions: tuple[int, ...] | None = None  # (text1[, text2], label) column indices
    excluded: tuple[str, ...] = ()  # header columns that mean another task's file (QNLI also has 'sentence','label')

    def matches(self, first_row: list[str]) -> bool:
        if self.header is not None:
            names = {cell.strip() for cell in first_row}
            return set(self.header) <= names and not names & set(self.excluded)
        *_, label_at = self.positions
        if len(first_row) <= max(self.positions):
            return False
        try:
            self.parse_label(first_row[label_at].strip())
        except ValueError:
            return False
        return True


_LAYOUTS: dict[str, tuple[_Layout, ...]] = {
    "sst2": (_Layout("header 'sentence<TAB>label'", _binary_label, "0/1", header=("sentence", "label"),
                     excluded=("question", "sentence1", "sentence2")),),
    "mrpc": (_Layout("header 'Quality<TAB>#1 ID<TAB>#2 ID<TAB>#1 String<TAB>#2 String'", _binary_label, "0/1",
                     header=("#1 String", "#2 String", "Quality")),),
    "stsb": (_Layout("GLUE header with 'sentence1', 'sentence2', 'score'", _score, "a score in [0, 5]",
                     header=("sentence1", "sentence2", "score")),
             _Layout("sts-*.tsv without header: genre, file, year, id, score, sentence1, sentence2", _score,
                     "a score in [0, 5]", positions=(5, 6, 4))),
    "cola": (_Layout("no header: source, label (0/1), original mark, sentence", _binary_label, "0/1", positions=(3, 1)),),
    "rte": (_Layout("header with 'sentence1', 'sentence2', 'label'", _entailment_label,
                    "0/1 or entailment/not_entailment", header=("sentence1", "sentence2", "label")),),
    "qnli": (_Layout("header with 'question', 'sentence', 'label'", _entailment_label,
                     "0/1 or entailment/not_entailment", header=("question", "sentence", "label")),),
}


def expected_glue_layouts(task: str) -> str:
    """The accepted layouts of ``task``'s evaluation files, for error messages and ``--help``."""
    return " or ".join(layout.description for layout in _LAYOUTS[task])


def load_glue_eval_file(task: str, path: str | Path) -> list[dict]:
    """Examples ``{"sentence1", "sentence2", "label"}`` of a labelled GLUE TSV in ``task``'s dev-file layout."""
    if task not in _LAYOUTS:
        raise DataError(f"unknown GLUE task {task!r}; choose from {sorted(_LAYOUTS)}")
    path = Path(path)
    expected = expected_glue_layouts(task)
    rows = _tsv_rows(_check_text_file(path, f"a {task} TSV ({expected})"))
    if not rows:
        raise DataError(f"{path}: file is empty; expected a {task} TSV ({expected})")
    first = rows[0][1]
    layout = next((candidate for candidate in _LAYOUTS[task] if candidate.matches(first)), None)
    if layout is None:
        raise DataError(f"{path}: not a labelled {task} file; expected columns: {expected} (first row: {first[:6]})")
    if layout.header is not None:
        names = [cell.strip() for cell in first]
        columns, body = tuple(names.index(name) for name in layout.header), rows[1:]
    else:
        columns, body = layout.positions, rows
    *text_columns, label_column = columns
    examples = []
    for line, row in body:
        if len(row) <= max(columns):
            raise DataError(f"{path}:{line}: expected {max(columns) + 1}+ tab-separated columns ({expected}), found {len(row)}")
        try:
            label = layout.parse_label(row[label_column].strip())
        except ValueError:
            raise DataError(f"{path}:{line}: label {row[label_column]!r} is not {layout.label_meaning} "
                            "(an unlabelled GLUE test file cannot be scored)") from None
        texts = [row[index] for index in text_columns]
        examples.append({"sentence1": texts[0], "sentence2": texts[1] if len(texts) > 1 else None, "label": label})
    if not examples:
        raise DataError(f"{path}: no examples after the header; expected {expected}")
    return examples


_E2E_LAYOUTS = "a LoRA-format file ('MR||reference' lines) or an E2E CSV with header mr,ref (testset_w_refs.csv)"


def _e2e_layout(first_line: str) -> str | None:
    """"lora" for an ``MR||reference`` line, "csv" for an E2E CSV header with an ``mr`` column, else None."""
    if SEPARATOR in first_line:
        return "lora"
    return "csv" if "mr" in [cell.strip().lower() for cell in next(csv.reader([first_line]), [])] else None


def load_e2e_eval_file(path: str | Path) -> list[tuple[str, list[str]]]:
    """``(mr, references)`` per distinct MR (first-appearance order) of a LoRA-format file or an ``mr,ref`` CSV.

    ``mr`` is in the LoRA linearisation without the separator (``name : Aromi | Type : coffee shop``); references
    are Moses-tokenised as in LoRA's files.
    """
    path = Path(path)
    text = _check_text_file(path, _E2E_LAYOUTS)
    first = next((line for line in text.replace("\r\n", "\n").split("\n") if line.strip()), "")
    layout = _e2e_layout(first)
    if layout == "lora":
        return group_by_mr(read_lora_format(path))
    if layout == "csv":
        lines = csv_to_lora_lines(path)
        return group_by_mr([(mr.strip(), ref.strip()) for mr, ref in (line.split(SEPARATOR) for line in lines)])
    raise DataError(f"{path}: not an E2E references file; expected {_E2E_LAYOUTS} (first line: {first[:80]!r})")


def _normalise_mr(prompt: str) -> str:
    text = prompt.strip()
    if text.endswith(SEPARATOR):
        text = text[: -len(SEPARATOR)]
    return " ".join(text.split())


def check_mrs_match(expected_prompts: list[str], file_prompts: list[str], path: str | Path) -> None:
    """Raise a one-line error unless a references file has the run's MRs in the run's order.

    Prompts are compared after dropping a trailing ``||`` and repeated spaces, so ``"name : A ||"`` (a run's prompt)
    matches ``"name : A"`` (a file's MR). Order matters: the scorer pairs the i-th output with the i-th group.
    """
    expected = [_normalise_mr(p) for p in expected_prompts]
    found = [_normalise_mr(p) for p in file_prompts]
    if expected == found:
        return
    found_set = set(found)
    missing = [mr for mr in expected if mr not in found_set]
    if missing or len(expected) != len(found):
        extra = len(found_set - set(expected))
        example = f"; first missing: {missing[0]!r}" if missing else ""
        raise DataError(f"{path}: its MRs do not match the run's ({len(found)} MRs in the file, {len(expected)} in the run, "
                        f"{len(missing)} of the run's missing, {extra} not in the run{example}); pass the references of "
                        "the same MR list")
    position = next(i for i, (a, b) in enumerate(zip(expected, found)) if a != b)
    raise DataError(f"{path}: same MRs as the run but in another order (first difference at MR {position + 1}: "
                    f"{found[position]!r} where the run has {expected[position]!r})")


def has_e2e_mrs(path: str | Path) -> bool:
    """True for an MR-bearing references layout (LoRA-format ``MR || ref`` lines or an ``mr,ref`` CSV)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8-sig", errors="replace") as fh:
            first = next((line for line in fh if line.strip()), "")
    except OSError:
        return False
    return _e2e_layout(first) is not None


def references_for_run_mrs(run_mrs: list[str], file_groups: list[tuple[str, list[str]]], path: str | Path) -> list[list[str]]:
    """The reference groups of a references file for a run's MRs, in the run's order.

    ``file_groups`` is :func:`load_e2e_eval_file`'s ``(mr, references)`` list. The file may hold more MRs than the run
    (a run evaluated with ``--eval-limit`` scored a prefix of dev): each run MR takes its own group. A run MR missing
    from the file, or a file with the same MRs in another order, is a one-line :class:`DataError`
    (:func:`check_mrs_match`'s message).
    """
    by_mr = {_normalise_mr(mr): refs for mr, refs in file_groups}
    wanted = [_normalise_mr(mr) for mr in run_mrs]
    if any(mr not in by_mr for mr in wanted):
        check_mrs_match(run_mrs, [mr for mr, _ in file_groups], path)  # raises, naming the first missing MR
    return [by_mr[mr] for mr in wanted]


def score_e2e_outputs(outputs: str | Path, references: str | Path) -> dict[str, float]:
    """Score E2E outputs against a references file, checking that both describe the same MRs where they can.

    ``outputs`` is a hypotheses file (one output per line) or a folder a run's evaluation wrote
    (``e2e_hypotheses.txt`` and ``e2e_mrs.txt``: a run directory, its ``step0/`` or ``eval_<file>/``).
    ``references`` is the official scorer's grouped layout (blank line between MRs), a LoRA-format file or an
    ``mr,ref`` CSV such as ``testset_w_refs.csv``. With MRs on both sides the references are taken per run MR and a
    run MR the file lacks is an error; with a bare hypotheses file the groups are taken in file order and their
    number must match.
    """
    from .metrics.e2e import read_e2e_hypotheses, score_e2e, score_e2e_files

    outputs, references = Path(outputs), Path(references)
    run_mrs: list[str] | None = None
    hypotheses_file = outputs
    if outputs.is_dir():
        hypotheses_file, mrs_file = outputs / "e2e_hypotheses.txt", outputs / "e2e_mrs.txt"
        if not hypotheses_file.is_file():
            raise DataError(f"{outputs}: no e2e_hypotheses.txt in this folder; pass an E2E run directory (or its "
                            "step0/ or eval_<file>/ folder) or a hypotheses file")
        if mrs_file.is_file():
            run_mrs = read_e2e_hypotheses(mrs_file)
    if not has_e2e_mrs(references):
        if not references.is_file():
            raise DataError(f"references file not found: {references}")
        return score_e2e_files(hypotheses_file, references)
    hypotheses = read_e2e_hypotheses(hypotheses_file)
    groups = load_e2e_eval_file(references)
    if run_mrs is not None:
        if len(run_mrs) != len(hypotheses):
            raise DataError(f"{outputs}: {len(hypotheses)} lines in e2e_hypotheses.txt but {len(run_mrs)} in e2e_mrs.txt; "
                            "the run's evaluation output is incomplete, re-run `kasa eval`")
        refs = references_for_run_mrs(run_mrs, groups, references)
    else:
        if len(groups) != len(hypotheses):
            raise DataError(f"{len(hypotheses)} hypotheses in {hypotheses_file} but {len(groups)} MRs in {references}; "
                            "pass a run directory (its e2e_mrs.txt picks each MR's references) or references of the same MRs")
        refs = [group for _, group in groups]
    return score_e2e(hypotheses, refs)
