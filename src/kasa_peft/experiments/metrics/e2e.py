"""E2E NLG Challenge metrics, matching the official scorer (``measure_scores.py`` of tuetschek/e2e-metrics).

The official scorer computes five corpus-level metrics for system outputs ``h_i`` (one per meaning representation,
MR) against the human references ``R_i`` of that MR (a variable number per MR):

``BLEU``
    BLEU-4 of mteval-v13a (the Perl script the scorer runs), case-insensitive: ``BP · exp(¼ Σ_n log p_n)`` where
    ``p_n`` pools over the corpus the n-gram matches of each output (clipped by the maximum count of that n-gram in
    any one of its references) over the output's n-gram count, and ``BP = min(1, exp(1 − r/c))`` with ``c`` the
    output length and ``r`` the summed length of the reference closest in length to each output (ties: the
    shorter). A precision with no matches is smoothed to ``1/(2^k · count)`` (k = 1, 2, … for successive such n),
    mteval-v13a's default. Computed with ``nltk.translate.bleu_score.corpus_bleu`` and its ``method3`` smoothing,
    which is that scheme; on the E2E devset (first reference as output) it agrees with sacrebleu's independent
    mteval-13a BLEU (``tokenize="13a", lowercase=True, smooth_method="exp"``) to 1e-15, and the tokens with
    sacrebleu's 13a tokenizer on every devset reference. A fraction in [0, 1] (papers print it ×100).
``NIST``
    NIST-5 of mteval-v13a: ``Σ_{n=1..5} Σ_matches info(w_1..w_n) / (#output n-grams)`` times the length penalty
    ``exp(−β · ln²(min(1, L_sys / L_ref)))`` with β chosen so that a 2/3 length ratio scores 0.5. The information
    weight is ``info(w_1..w_n) = log2(count(w_1..w_{n-1}) / count(w_1..w_n))`` over all references of the corpus
    (the unigram case divides the total number of reference words). Matches are clipped as for BLEU. ``L_ref`` is
    mteval's "average reference length", i.e. the total number of reference words divided by the number of
    reference *sets*; the scorer pads MRs with fewer references with empty ones, so that number is the largest
    group size (this is what the scorer's ``mteval-v13a-sig.pl`` does, and it makes ``L_ref`` shorter than the
    true average when groups differ in size). Around 8–9 for good E2E systems.
``METEOR``
    METEOR 1.5 (``java -jar meteor-1.5.jar - - -stdio -l en -norm``, the jar ``pycocoevalcap`` ships, with its
    English paraphrase table): the corpus-level score the jar reports for all segments, in [0, 1].
``ROUGE_L``
    coco-caption's ROUGE-L: per MR, ``P = max_r LCS(h, r)/|h|`` and ``R = max_r LCS(h, r)/|r|`` over its
    references, ``F = (1 + β²)·P·R / (R + β²·P)`` with β = 1.2; the corpus score is the mean of ``F``. In [0, 1].
``CIDEr``
    coco-caption's CIDEr-D: TF-IDF vectors of 1..4-grams (IDF from the references of the scored corpus), clipped
    cosine similarity with each reference times a Gaussian length penalty (σ = 6), averaged over n, over the
    references and over MRs, ×10. Because the IDF comes from the corpus being scored, a subset of MRs does not
    score its share of the full-corpus value, and a single MR always scores 0. Around 2–2.5 for good E2E systems.

Tokenisation follows the scorer too. BLEU and NIST see mteval-v13a's tokenisation (:func:`mteval_tokenize`: SGML
entities decoded, ASCII letters lowercased, punctuation split off except ``.``/``,`` between digits, and ``-``
after a digit; only ASCII letters are lowercased, as by the script's ``tr/[A-Z]/[a-z]/``, so ``É`` does not match
``é``). METEOR, ROUGE_L and CIDEr see the MS-COCO pipeline's tokenisation (:func:`ptb_tokenize`: the Stanford
CoreNLP 3.4.1 PTBTokenizer with ``-lowerCase``, then coco-caption's punctuation tokens dropped), so those three
need Java, as in the official scorer.

NIST is computed by :func:`mteval_nist`, written here from mteval-v13a's definition (down to its Perl-truthiness
quirk for a one-token prefix ``"0"``), not with ``nltk.translate.nist_score.corpus_nist``: nltk scores each output
against the single reference giving the best precision and takes that reference's length for the length penalty,
where mteval clips against all references jointly and uses the average reference length, so nltk's value is a
different number. On the devset sample of the tests (the first 20 MRs of devset.csv, first reference as the
output, the others as references) mteval's definition gives 7.016 and nltk 5.560; on all 547 devset MRs 8.579
against 7.410. The scorer's Python port (``measure_scores.py -p``) averages the reference length per MR instead of
using mteval's padded count of reference sets (7.002 and 8.579 there); with that one difference removed, it agrees
with :func:`mteval_nist` to 1e-12.

Known deviations from the official scorer (the default, Perl, path of ``measure_scores.py``):

* BLEU when *no* output unigram matches anywhere in the corpus: nltk returns 0.0, mteval's Perl returns the
  smoothed value (e.g. 0.053 for one 5-word output against a 5-word reference with no word in common; the scorer's
  Python port returns ≈ 0).
* BLEU with outputs shorter than n tokens (an empty output, say): nltk counts at least one n-gram per output in
  the denominator of ``p_n``, mteval counts none; this lowers ``p_n`` by one count per such output (a change in the
  4th decimal or below on a full test set).
* All texts go through one PTBTokenizer run (the scorer runs references and outputs separately; the tokenizer
  works line by line, so the tokens are the same). Line breaks inside one text are replaced by spaces first (the
  official scorer would misalign its texts there).
* Readers: a UTF-8 byte-order mark is dropped; several blank lines in a row in a references file are rejected
  (the official reader would make an empty reference group of them); trailing blank lines are ignored. A single
  hypothesis with a references file without blank lines is scored against all its lines as one group (the official
  scorer would take them as single references of as many MRs and stop on the count mismatch).
"""

from __future__ import annotations

import math
import re
import shutil
import string
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

E2E_METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
_COCO_METRICS = frozenset({"METEOR", "ROUGE_L", "CIDEr"})

METEOR_NEEDS_JAVA = "METEOR needs Java 17+ on PATH: install a JRE or pass metrics without METEOR"
PTB_NEEDS_JAVA = (
    "ROUGE_L and CIDEr need Java 17+ on PATH for the official scorer's PTB tokenisation (Stanford CoreNLP): "
    "install a JRE or pass metrics=('BLEU', 'NIST')"
)

# ---------------------------------------------------------------------------------------------------------------
# mteval-v13a tokenisation, BLEU and NIST
# ---------------------------------------------------------------------------------------------------------------

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
# mteval-v13a's "tokenize punctuation" class: { | } ~  [ \ ] ^ _ `  space ! " # $ % &  ( ) * +  : ; < = > ? @  /
# (apostrophe, '-', '.' and ',' are not in it; non-ASCII characters are never split off).
_MTEVAL_PUNCT = re.compile(r"([\x7b-\x7e\x5b-\x60\x20-\x26\x28-\x2b\x3a-\x40/])")
_MTEVAL_PERIOD_COMMA_AFTER = re.compile(r"([^0-9])([.,])")
_MTEVAL_PERIOD_COMMA_BEFORE = re.compile(r"([.,])([^0-9])")
_MTEVAL_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")
_WHITESPACE = re.compile(r"\s+")


def mteval_tokenize(text: str) -> list[str]:
    """Tokens of ``text`` as mteval-v13a's default (non-international) tokenisation makes them, lowercased.

    The scorer writes each text into an SGML ``<seg>``, whose reader collapses whitespace runs to one space; then
    ``<skipped>`` is deleted, the entities ``&quot; &amp; &lt; &gt;`` are decoded (in that order), ASCII letters are
    lowercased, the ASCII punctuation class of the script is split off, ``.``/``,`` are split off unless both
    neighbours are digits, ``-`` is split off after a digit, and the result is split on whitespace.
    ``"5-star café, £20-25."`` → ``['5', '-', 'star', 'café', ',', '£20', '-', '25', '.']``.
    """
    norm = _WHITESPACE.sub(" ", text).replace("<skipped>", "")
    norm = norm.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    norm = f" {norm} ".translate(_ASCII_LOWER)
    norm = _MTEVAL_PUNCT.sub(r" \1 ", norm)
    norm = _MTEVAL_PERIOD_COMMA_AFTER.sub(r"\1 \2 ", norm)
    norm = _MTEVAL_PERIOD_COMMA_BEFORE.sub(r" \1 \2", norm)
    norm = _MTEVAL_DASH_AFTER_DIGIT.sub(r"\1 \2 ", norm)
    return norm.split()


def _ngrams(tokens: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def mteval_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 as mteval-v13a computes it (see the module docstring), on :func:`mteval_tokenize` tokens."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    hypotheses, references = _check_corpus(hypotheses, references)
    hyp_tokens = [mteval_tokenize(h) for h in hypotheses]
    ref_tokens = [[mteval_tokenize(r) for r in group] for group in references]
    score = corpus_bleu(
        ref_tokens, hyp_tokens, weights=(0.25, 0.25, 0.25, 0.25), smoothing_function=SmoothingFunction().method3
    )
    return float(score)


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2  # a system/reference length ratio of 2/3 gives 0.5
    return math.exp(-beta * math.log(ratio) ** 2)


def mteval_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 5) -> float:
    """Corpus NIST-``max_n`` as the scorer's ``mteval-v13a-sig.pl`` computes it (see the module docstring).

    Written here rather than taken from nltk, whose ``corpus_nist`` picks one best reference per output instead of
    clipping against all references, and whose length penalty uses that reference's length.
    """
    hypotheses, references = _check_corpus(hypotheses, references)
    hyp_tokens = [mteval_tokenize(h) for h in hypotheses]
    ref_tokens = [[mteval_tokenize(r) for r in group] for group in references]

    # Information weights from every reference of the corpus.
    ref_counts: Counter[tuple[str, ...]] = Counter()
    total_ref_words = 0
    for group in ref_tokens:
        for ref in group:
            total_ref_words += len(ref)
            for n in range(1, max_n + 1):
                ref_counts.update(_ngrams(ref, n))

    def info(ngram: tuple[str, ...]) -> float:
        prefix = ngram[:-1]
        # mteval tests the (n-1)-gram string for Perl truth, so a prefix that is the single token "0" counts as
        # absent and the total word count is used instead; kept for fidelity.
        context = ref_counts[prefix] if prefix and prefix != ("0",) else total_ref_words
        return math.log2(context / ref_counts[ngram])

    hit_info = [0.0] * max_n
    hyp_ngram_counts = [0] * max_n
    for hyp, group in zip(hyp_tokens, ref_tokens, strict=True):
        for n in range(1, max_n + 1):
            hyp_ngram_counts[n - 1] += max(0, len(hyp) - n + 1)
            ref_max: dict[tuple[str, ...], int] = {}
            for ref in group:
                for ngram, count in Counter(_ngrams(ref, n)).items():
                    ref_max[ngram] = max(ref_max.get(ngram, 0), count)
            for ngram, count in Counter(_ngrams(hyp, n)).items():
                matched = min(count, ref_max.get(ngram, 0))
                if matched:
                    hit_info[n - 1] += info(ngram) * matched

    score = sum(hit_info[n] / max(hyp_ngram_counts[n], 1) for n in range(max_n))
    n_reference_sets = max(len(group) for group in ref_tokens)
    avg_ref_length = total_ref_words / n_reference_sets
    if avg_ref_length == 0:
        return 0.0
    return score * _nist_length_penalty(hyp_ngram_counts[0] / avg_ref_length)


# ---------------------------------------------------------------------------------------------------------------
# MS-COCO side: PTB tokenisation, METEOR, ROUGE-L, CIDEr (pycocoevalcap)
# ---------------------------------------------------------------------------------------------------------------

# Characters the PTBTokenizer treats as line ends: they would break the one-text-per-line alignment.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x85\u2028\u2029]")


def _find_java(message: str) -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(message)
    return java


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """The MS-COCO evaluation's tokenisation of each sentence, as a space-joined string.

    Runs the Stanford CoreNLP 3.4.1 ``PTBTokenizer -preserveLines -lowerCase`` that ``pycocoevalcap`` ships (one
    JVM for all sentences; its temporary input file goes to a private temporary directory, not into the package),
    then drops the tokens in ``pycocoevalcap``'s ``PUNCTUATIONS`` list, exactly as its ``PTBTokenizer`` wrapper
    does. Needs ``java`` on PATH.
    """
    if not sentences:
        return []
    java = _find_java(PTB_NEEDS_JAVA)
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).resolve().with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    text = "\n".join(_LINE_BREAKS.sub(" ", s) for s in sentences)
    with tempfile.TemporaryDirectory(prefix="kasa-ptb-") as tmp:
        source = Path(tmp) / "sentences.txt"
        source.write_text(text, encoding="utf-8")
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
        proc = subprocess.run([*cmd, str(source)], capture_output=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise RuntimeError(
            f"the PTB tokenizer (Stanford CoreNLP, via java) failed with exit code {proc.returncode}: {err}"
        )
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) != len(sentences):
        raise RuntimeError(f"the PTB tokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    drop = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in drop) for line in lines]


def _check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    chosen = tuple(dict.fromkeys(metrics))
    unknown = [m for m in chosen if m not in E2E_METRICS]
    if unknown:
        raise ValueError(f"unknown E2E metric(s) {unknown}: choose from {', '.join(E2E_METRICS)}")
    if not chosen:
        raise ValueError(f"no metrics requested: choose from {', '.join(E2E_METRICS)}")
    return chosen


def _check_corpus(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    if isinstance(hypotheses, str) or not all(isinstance(h, str) for h in hypotheses):
        raise TypeError("hypotheses must be a sequence of strings (one output per MR)")
    if isinstance(references, str):
        raise TypeError("references must be a sequence of reference groups (a list of strings per MR)")
    hyps = list(hypotheses)
    groups: list[list[str]] = []
    for i, group in enumerate(references):
        if isinstance(group, str) or not all(isinstance(r, str) for r in group):
            raise TypeError(f"reference group {i} must be a list of strings, got {type(group).__name__}")
        if len(group) == 0:
            raise ValueError(f"reference group {i} is empty: every MR needs at least one reference")
        groups.append(list(group))
    if len(hyps) != len(groups):
        raise ValueError(f"{len(hyps)} hypotheses but {len(groups)} reference groups: need one group per hypothesis")
    if not hyps:
        raise ValueError("nothing to score: no hypotheses")
    return hyps, groups


class E2EScorer:
    """Scores E2E outputs with the official scorer's metrics, keeping one METEOR JVM for all :meth:`score` calls.

    Starting METEOR costs ~10 s (the JVM loads its paraphrase table), so a loop that scores many checkpoints
    should keep one scorer open; :func:`score_e2e` makes and closes one per call. Use it as a context manager or
    call :meth:`close`, which ends the METEOR process. Not thread-safe.
    """

    def __init__(self, metrics: Iterable[str] = E2E_METRICS) -> None:
        self.metrics = _check_metrics(metrics)
        if "METEOR" in self.metrics:
            _find_java(METEOR_NEEDS_JAVA)
        elif _COCO_METRICS.intersection(self.metrics):
            _find_java(PTB_NEEDS_JAVA)
        self._meteor: Any = None

    def __enter__(self) -> E2EScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the METEOR process, if one was started; the scorer can still be used (it would start a new one)."""
        meteor, self._meteor = self._meteor, None
        if meteor is None:
            return
        proc = meteor.meteor_p
        try:
            proc.stdin.close()
        except OSError:  # the JVM already died: its pipe is broken
            pass
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        # pycocoevalcap's Meteor.__del__ takes this lock; after an error inside compute_score it is still held,
        # and a garbage-collected Meteor would then block forever.
        if meteor.lock.locked():
            meteor.lock.release()

    def _meteor_score(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
        if self._meteor is None:
            _find_java(METEOR_NEEDS_JAVA)
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()  # java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm
        try:
            score, _ = self._meteor.compute_score(gts, res)
        except (OSError, ValueError) as error:  # a broken pipe, or an empty line read from a dead JVM
            proc = self._meteor.meteor_p
            detail = ""
            if proc.poll() is not None:
                detail = proc.stderr.read().decode("utf-8", "replace").strip()[-2000:]
            self.close()
            raise RuntimeError(f"METEOR 1.5 (java -jar meteor-1.5.jar) failed: {detail or error}") from error
        return float(score)

    def score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
        """Corpus scores of ``hypotheses[i]`` against ``references[i]`` (a list of strings), for each metric.

        Returns ``{metric: value}`` in the order of ``self.metrics``. Raises ``ValueError`` when the number of
        hypotheses and reference groups differ, or a group is empty.
        """
        hyps, groups = _check_corpus(hypotheses, references)
        scores: dict[str, float] = {}
        if "BLEU" in self.metrics:
            scores["BLEU"] = mteval_bleu(hyps, groups)
        if "NIST" in self.metrics:
            scores["NIST"] = mteval_nist(hyps, groups)
        if _COCO_METRICS.intersection(self.metrics):
            flat_refs = [ref for group in groups for ref in group]
            tokens = ptb_tokenize(flat_refs + hyps)
            res = {i: [tokens[len(flat_refs) + i]] for i in range(len(hyps))}
            gts: dict[int, list[str]] = {}
            start = 0
            for i, group in enumerate(groups):
                gts[i] = tokens[start : start + len(group)]
                start += len(group)
            if "METEOR" in self.metrics:
                scores["METEOR"] = self._meteor_score(gts, res)
            if "ROUGE_L" in self.metrics:
                from pycocoevalcap.rouge.rouge import Rouge

                scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
            if "CIDEr" in self.metrics:
                from pycocoevalcap.cider.cider import Cider

                scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        return {metric: scores[metric] for metric in self.metrics}


def score_e2e(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], metrics: Iterable[str] = E2E_METRICS
) -> dict[str, float]:
    """Score one system output per MR against that MR's references with the official E2E metrics.

    ``metrics`` is any subset of ``("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")``; METEOR, ROUGE_L and CIDEr need
    ``java`` on PATH (a ``RuntimeError`` says so otherwise). Scale: BLEU, METEOR and ROUGE_L are fractions in
    [0, 1], NIST is around 8–9 and CIDEr around 2–2.5 for good systems. See the module docstring for definitions.
    """
    with E2EScorer(metrics) as scorer:
        return scorer.score(hypotheses, references)


# ---------------------------------------------------------------------------------------------------------------
# Files in the e2e-metrics format
# ---------------------------------------------------------------------------------------------------------------


def _existing_file(path: str | Path, what: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"E2E {what} file not found: {file}")
    return file


def read_e2e_hypotheses(path: str | Path) -> list[str]:
    """System outputs, one per line (stripped; an empty line is an empty output), as the official scorer reads them."""
    with _existing_file(path, "hypotheses").open(encoding="utf-8-sig") as fh:
        return [line.strip() for line in fh]


def read_e2e_references(path: str | Path) -> list[list[str]]:
    """Reference groups: one reference per line, the groups of consecutive MRs separated by one blank line.

    Windows line endings and trailing blank lines are accepted; a blank line before the first group, or several in
    a row between groups, raise ``ValueError`` (they would make an MR without references).
    """
    file = _existing_file(path, "references")
    groups: list[list[str]] = [[]]
    with file.open(encoding="utf-8-sig") as fh:
        lines = [line.strip() for line in fh]
    while lines and not lines[-1]:
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
        else:
            raise ValueError(f"{file}, line {number}: a blank line that starts an empty reference group")
    return groups if groups[0] else []


def score_e2e_files(
    hyp_path: str | Path, refs_path: str | Path, metrics: Iterable[str] = E2E_METRICS
) -> dict[str, float]:
    """:func:`score_e2e` on a hypotheses file and a references file in the e2e-metrics format.

    As in the official scorer, a references file without any blank line holds one (single) reference per MR, unless
    there is exactly one hypothesis. Raises ``ValueError`` naming both counts and both paths when the number of
    hypotheses and of reference groups differ, ``FileNotFoundError`` naming a missing file.
    """
    hypotheses = read_e2e_hypotheses(hyp_path)
    references = read_e2e_references(refs_path)
    note = ""
    if len(references) == 1 and len(hypotheses) != 1:
        references = [[ref] for ref in references[0]]
        note = " (the references file has no blank line, so it was read as one reference per line)"
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses in {hyp_path} but {len(references)} reference groups in {refs_path}{note}"
        )
    return score_e2e(hypotheses, references, metrics)
