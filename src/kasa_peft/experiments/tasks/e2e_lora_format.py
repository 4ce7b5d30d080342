"""E2E CSV ↔ the LoRA repository's pre-tokenised ``MR||reference`` lines (``examples/NLG/data/e2e/*.txt``).

One line per (MR, reference) pair, in CSV order::

    name : Alimentum | area : city centre | family friendly : no||There is a place in the city centre , Alimentum , that is not family - friendly . \\n

How that file was made (shared/anchors/README.md §4): each reference is sentence-split, every sentence is
Moses-tokenised (English, aggressive dash splitting written as a bare ``-``, no XML escaping) and the sentences are
joined by one space; MR keys are renamed (eatType → ``Type``, priceRange → ``price``, familyFriendly →
``family friendly``) and MR values are tokenised the same way; the line ends in ``" \\n"`` (a space after the
reference). ``csv_to_lora_lines(devset.csv)`` reproduces LoRA's ``valid.txt`` byte for byte (a test).

Sentence splitting: the original used NLTK's pretrained Punkt model, whose parameter file is not available offline
(and is a pickle). ``split_sentences`` implements the Punkt decisions that occur in E2E text — a period that ends a
word ends a sentence, except after an abbreviation (``St.``) or an initial, and except after a bare number followed
by a lower-case word (Punkt's orthographic heuristic: ``5. in the city``). Its effect on the output is only on
sentence-final periods: the Moses tokeniser splits a period off only at the end of its input.
"""

from __future__ import annotations

import csv
import functools
import re
from pathlib import Path

from kasa_peft.checkpoint import atomic_write_text

from .common import DataError

SEPARATOR = "||"
MR_KEY_NAMES = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}
_SLOT = re.compile(r"\s*([^\[,]+)\[([^\]]*)\]")
# Punkt's number type (nltk.tokenize.punkt: ``^-?[\.,]?\d[\d,\.-]*\.?$``) and initial (one letter and a period).
_NUMBER = re.compile(r"-?[.,]?\d[\d,.-]*\.?")
_INITIAL = re.compile(r"[^\W\d]\.")
# Abbreviations of Punkt's English model that occur in E2E references (a period after them does not end a sentence).
_ABBREVIATIONS = frozenset({"st", "mr", "mrs", "ms", "dr", "jr", "sr", "vs", "etc", "e.g", "i.e"})
_LEADING_PUNCT = re.compile(r"^[(\"`{\[:;&#*@)}\]\-,']+")


@functools.lru_cache(maxsize=1)
def _moses():
    try:
        from sacremoses import MosesTokenizer
    except ImportError:  # pragma: no cover - the experiments extra installs it
        raise DataError("the E2E LoRA-format converter needs sacremoses: pip install 'kasa-peft[experiments]'") from None
    return MosesTokenizer(lang="en")


def moses_tokenize(text: str) -> str:
    """Moses English tokenisation, aggressive dash splitting, no escaping; ``a-b`` → ``a - b`` as in LoRA's files.

    sacremoses marks a split dash as ``@-@`` (newer Moses convention); the 2018 files carry a bare ``-``.
    """
    tokens = _moses().tokenize(text, aggressive_dash_splits=True, return_str=False, escape=False)
    return " ".join("-" if token == "@-@" else token for token in tokens)


def _ends_sentence(word: str, next_word: str) -> bool:
    """Punkt's decision for a whitespace-delimited ``word`` that ends in ``.``, ``?`` or ``!`` (see module doc)."""
    if word[-1] in "?!":
        return True
    if word.endswith(".."):  # an ellipsis: Moses keeps it as one token either way
        return False
    core = _LEADING_PUNCT.sub("", word)
    stem = core[:-1].lower()
    if stem in _ABBREVIATIONS or stem.split("-")[-1] in _ABBREVIATIONS or _INITIAL.fullmatch(core):
        return False
    if _NUMBER.fullmatch(core):
        # Orthographic heuristic: a lower-case (or punctuation) next token says "not a sentence starter".
        return not (next_word[0].islower() or next_word in (";", ":", ",", ".", "!", "?"))
    return True


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (whitespace between them dropped); see the module docstring for the rule."""
    words = text.split()
    sentences, current = [], []
    for index, word in enumerate(words):
        current.append(word)
        if index + 1 < len(words) and word[-1] in ".?!" and _ends_sentence(word, words[index + 1]):
            sentences.append(" ".join(current))
            current = []
    if current:
        sentences.append(" ".join(current))
    return sentences


def tokenize_reference(text: str) -> str:
    """A reference as LoRA's files have it: sentence-split, each sentence Moses-tokenised, joined by spaces."""
    return " ".join(moses_tokenize(sentence) for sentence in split_sentences(text))


@functools.lru_cache(maxsize=8192)  # a training CSV repeats each MR about ten times
def format_lora_mr(mr: str) -> str:
    """``name[Alimentum], familyFriendly[no]`` → ``name : Alimentum | family friendly : no`` (values tokenised)."""
    slots = _SLOT.findall(mr)
    if not slots:
        raise DataError(f"not an E2E meaning representation: {mr!r}")
    return " | ".join(f"{MR_KEY_NAMES.get(key.strip(), key.strip())} : {moses_tokenize(value)}" for key, value in slots)


def read_e2e_csv(csv_path: str | Path, require_refs: bool = True) -> list[tuple[str, str | None]]:
    """``(mr, ref)`` rows of an E2E dataset CSV (``mr,ref`` header as trainset/devset/testset_w_refs.csv).

    With ``require_refs`` a file without a ``ref`` column (``testset.csv``: MRs only) is an error.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(f"E2E CSV not found: {path}")
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: not a UTF-8 E2E CSV with columns mr,ref ({error.__class__.__name__})") from None
    if not rows:
        raise DataError(f"{path}: file is empty; expected an E2E CSV with header mr,ref")
    header = [cell.strip().lower() for cell in rows[0]]
    if "mr" not in header:
        raise DataError(f"{path}: header must name columns mr,ref (found {rows[0][:4]})")
    if require_refs and "ref" not in header:
        raise DataError(f"{path}: no 'ref' column (found {rows[0][:4]}); references come in a mr,ref file such as testset_w_refs.csv")
    mr_col, ref_col = header.index("mr"), header.index("ref") if "ref" in header else None
    pairs = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(mr_col, ref_col or 0):
            raise DataError(f"{path}:{line}: expected columns {header}, found {len(row)}")
        pairs.append((row[mr_col], row[ref_col] if ref_col is not None else None))
    return pairs


def csv_to_lora_lines(csv_path: str | Path) -> list[str]:
    """LoRA-format lines (without the newline; each ends in the space the LoRA files have) of an ``mr,ref`` CSV."""
    lines = []
    for mr, ref in read_e2e_csv(csv_path, require_refs=True):
        lines.append(f"{format_lora_mr(mr)}{SEPARATOR}{tokenize_reference(ref)} ")
    return lines


def write_lora_format(csv_path: str | Path, out_path: str | Path) -> int:
    """Convert an E2E CSV to a LoRA-format file (written atomically); returns the number of lines."""
    lines = csv_to_lora_lines(csv_path)
    atomic_write_text(out_path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_lora_format(path: str | Path) -> list[tuple[str, str]]:
    """``(mr, reference)`` pairs of a LoRA-format file, both stripped of surrounding spaces.

    ``mr`` is the text before ``||`` (``name : Alimentum | area : city centre``); a prompt is ``mr + "||"``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"LoRA-format E2E file not found: {path}")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise DataError(f"{path}: binary data; expected a LoRA-format E2E text file ('MR||reference' lines)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; expected a LoRA-format E2E file ('MR||reference' lines)") from None
    pairs = []
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):  # only newlines end a line
        if not line.strip():
            continue
        if line.count(SEPARATOR) != 1:
            raise DataError(f"{path}:{number}: expected one 'MR||reference' pair per line, found {line.count(SEPARATOR)} '||'")
        mr, reference = line.split(SEPARATOR)
        if not mr.strip() or not reference.strip():
            raise DataError(f"{path}:{number}: empty MR or reference in 'MR||reference' line")
        pairs.append((mr.strip(), reference.strip()))
    if not pairs:
        raise DataError(f"{path}: no 'MR||reference' lines")
    return pairs


def group_by_mr(pairs: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """``(mr, [references…])`` per distinct MR in order of first appearance (the official e2e-metrics grouping)."""
    groups: dict[str, list[str]] = {}
    for mr, reference in pairs:
        groups.setdefault(mr, []).append(reference)
    return list(groups.items())
