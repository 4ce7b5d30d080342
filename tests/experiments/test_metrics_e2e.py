"""E2E metrics: hand-checked values, the e2e-metrics file formats, and a smoke test on devset references."""

from __future__ import annotations

import csv
import math
import shutil

import pytest

from kasa_peft.experiments.metrics import e2e
from kasa_peft.experiments.metrics.e2e import (
    E2E_METRICS,
    METEOR_NEEDS_JAVA,
    E2EScorer,
    mteval_bleu,
    mteval_nist,
    mteval_tokenize,
    read_e2e_hypotheses,
    read_e2e_references,
    score_e2e,
    score_e2e_files,
)

from _paths import DATA as DATA_DIR  # noqa: E402  (tests/experiments is on sys.path under pytest)
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR/ROUGE_L/CIDEr need java on PATH")


@pytest.fixture(scope="module")
def scorer():
    """One scorer (one METEOR JVM, ~10 s to start) for all the hand-checked cases of this module."""
    if shutil.which("java") is None:
        pytest.skip("METEOR/ROUGE_L/CIDEr need java on PATH")
    with E2EScorer() as s:
        yield s


# --- mteval-v13a tokenisation, BLEU, NIST (pure Python) -----------------------------------------------------------


def test_mteval_tokenize_rules():
    # ASCII lowercased; '-' split after a digit ("5-" and "0-"); ',' and '.' split unless between digits
    # ("3.5" and "1,000" stay whole); '£' is not ASCII punctuation so "£20" stays one token; &amp; is decoded.
    text = "The Eagle is a 5-star café, near £20-25 (3.5 of 1,000) &amp; Co."
    assert mteval_tokenize(text) == [
        "the", "eagle", "is", "a", "5", "-", "star", "café", ",", "near", "£20", "-", "25",
        "(", "3.5", "of", "1,000", ")", "&", "co", ".",
    ]  # fmt: skip
    # mteval's tr/[A-Z]/[a-z]/ lowercases ASCII only.
    assert mteval_tokenize("CAFÉ") == ["cafÉ"]
    assert mteval_tokenize("  ") == []


def test_bleu_by_hand_with_brevity_penalty():
    hyp = "the cat sat on the mat"  # 6 tokens
    ref = "the cat sat on the red mat"  # 7 tokens
    # 1-grams: all 6 hypothesis unigrams occur in the reference (it has "the" twice) → p1 = 6/6
    # 2-grams: the cat, cat sat, sat on, on the match; "the mat" does not → p2 = 4/5
    # 3-grams: the cat sat, cat sat on, sat on the match; "on the mat" does not → p3 = 3/4
    # 4-grams: the cat sat on, cat sat on the match; "sat on the mat" does not → p4 = 2/3
    # BP = exp(1 − r/c) = exp(1 − 7/6); BLEU = BP · (p1·p2·p3·p4)^(1/4)
    expected = math.exp(1 - 7 / 6) * (1 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert expected == pytest.approx(0.673182138, abs=1e-9)
    assert mteval_bleu([hyp], [[ref]]) == pytest.approx(expected, abs=1e-6)


def test_bleu_by_hand_with_mteval_smoothing():
    hyp = "alpha beta gamma delta epsilon"  # 5 tokens
    ref = "alpha beta gamma zeta delta epsilon"  # 6 tokens
    # p1 = 5/5; 2-grams: alpha beta, beta gamma, delta epsilon of 4 → 3/4; 3-grams: alpha beta gamma of 3 → 1/3;
    # 4-grams: none of 2 match → mteval-v13a smoothing, 1/(2^k · count) with k = 1 → 1/(2·2) = 1/4.
    # BP = exp(1 − 6/5); BLEU = exp(−0.2) · (1 · 3/4 · 1/3 · 1/4)^(1/4) = exp(−0.2) · (1/16)^(1/4) = exp(−0.2)/2
    assert mteval_bleu([hyp], [[ref]]) == pytest.approx(math.exp(-0.2) / 2, abs=1e-6)


def test_bleu_is_case_insensitive_and_clips_against_the_best_reference():
    hyp = "The the the the"
    # Each n-gram is clipped by its largest count in any single reference: "the" ×2 (first reference) → p1 = 2/4.
    refs = ["the cat and the dog", "a the"]
    # p1 = 2/4, p2: "the the" ×3 has no match → smoothed 1/(2·3); p3: 1/(4·2); p4: 1/(8·1). Closest reference
    # length to 4: |5 − 4| = 1 < |2 − 4| → r = 5, BP = exp(1 − 5/4).
    expected = math.exp(1 - 5 / 4) * (1 / 2 * 1 / 6 * 1 / 8 * 1 / 8) ** 0.25
    assert mteval_bleu([hyp], [refs]) == pytest.approx(expected, abs=1e-9)


def test_nist_by_hand_with_mteval_average_reference_length():
    hypotheses = ["a", "d"]
    references = [["a b", "a c"], ["d"]]
    # Information weights over all 5 reference words: info(a) = log2(5/2), info(d) = log2(5/1).
    # 1-gram term: (info(a) + info(d)) / 2 hypothesis unigrams; no bigrams etc. in the hypotheses → 0.
    # mteval's average reference length: 5 words / 2 reference sets (the largest group) = 2.5, so the system/reference
    # length ratio is 2/2.5 = 0.8 and the penalty exp(−β ln²0.8) with β = −ln 0.5 / ln²1.5.
    beta = -math.log(0.5) / math.log(1.5) ** 2
    expected = (math.log2(5 / 2) + math.log2(5)) / 2 * math.exp(-beta * math.log(0.8) ** 2)
    assert expected == pytest.approx(1.476920553, abs=1e-9)
    assert mteval_nist(hypotheses, references) == pytest.approx(expected, abs=1e-9)


def test_nist_identical_two_words():
    # info(a) = info(b) = log2(2/1) = 1 and info(a b) = log2(count(a)/count(a b)) = 0 → (1 + 1)/2 = 1.
    assert mteval_nist(["a b"], [["a b"]]) == pytest.approx(1.0)


def test_bleu_and_nist_need_no_java(monkeypatch):
    monkeypatch.setattr(e2e.shutil, "which", lambda name: None)
    scores = score_e2e(["the cat sat on the mat"], [["the cat sat on the mat"]], metrics=("BLEU", "NIST"))
    assert list(scores) == ["BLEU", "NIST"]
    assert scores["BLEU"] == pytest.approx(1.0)


def test_missing_java_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(e2e.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError) as info:
        score_e2e(["a b c d"], [["a b c d"]])
    assert str(info.value) == METEOR_NEEDS_JAVA
    assert "METEOR needs Java 17+ on PATH" in METEOR_NEEDS_JAVA
    with pytest.raises(RuntimeError, match="ROUGE_L and CIDEr need Java"):
        score_e2e(["a b c d"], [["a b c d"]], metrics=("BLEU", "CIDEr"))


def test_input_validation():
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference groups"):
        score_e2e(["a", "b"], [["a"]], metrics=("BLEU",))
    with pytest.raises(ValueError, match="reference group 1 is empty"):
        score_e2e(["a", "b"], [["a"], []], metrics=("BLEU",))
    with pytest.raises(ValueError, match="unknown E2E metric"):
        score_e2e(["a"], [["a"]], metrics=("BLEU", "SPICE"))
    with pytest.raises(TypeError):
        score_e2e("a b", [["a b"]], metrics=("BLEU",))


# --- all five metrics through one shared scorer (Java) ---------------------------------------------------------


def test_identical_outputs(scorer):
    hyps = ["the cat sat on the mat", "a dog barked loudly at the mailman"]
    scores = scorer.score(hyps, [[h] for h in hyps])
    assert list(scores) == list(E2E_METRICS)
    assert scores["BLEU"] == pytest.approx(1.0)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    # METEOR 1.5 gives exactly 1.0 here, not Fmean·(1 − penalty) < 1: its fragmentation penalty is dropped when the
    # hypothesis and a reference match word for word in a single chunk.
    assert scores["METEOR"] == pytest.approx(1.0)
    # CIDEr-D: every n-gram vector equals its reference's (cosine 1 for n = 1..4), lengths are equal (no Gaussian
    # penalty), and the two sentences share no n-gram, so every IDF is log(2) > 0 → mean 1 × 10 = 10.
    assert scores["CIDEr"] == pytest.approx(10.0)


def test_no_shared_words(scorer):
    scores = scorer.score(["zebras run quickly today"], [["the cat sat on the mat"]])
    # nltk's corpus BLEU is 0 when no unigram matches (mteval's Perl would report its smoothed value instead; see
    # the module docstring), and the LCS is empty.
    assert scores["BLEU"] == 0.0
    assert scores["ROUGE_L"] == 0.0
    assert scores["METEOR"] == 0.0
    assert scores["NIST"] == 0.0


def test_rouge_l_by_hand(scorer):
    # hypothesis "a cat sat on mat" (5 tokens), reference "the cat sat on the mat" (6 tokens):
    # LCS = "cat sat on mat" = 4 → P = 4/5, R = 4/6; F = (1 + β²)·P·R / (R + β²·P) with β = 1.2.
    p, r, b2 = 4 / 5, 4 / 6, 1.2**2
    expected = (1 + b2) * p * r / (r + b2 * p)
    assert expected == pytest.approx(0.715542522, abs=1e-9)
    scores = scorer.score(["a cat sat on mat"], [["the cat sat on the mat"]])
    assert scores["ROUGE_L"] == pytest.approx(expected, abs=1e-9)


def test_rouge_l_takes_precision_and_recall_maxima_over_references(scorer):
    # Reference 1 "cat sat" (LCS 2): P = 2/4, R = 2/2; reference 2 "the cat sat on the mat" (LCS 4): P = 4/4,
    # R = 4/6. coco-caption takes max P = 1 and max R = 1 separately → F = 1.
    scores = scorer.score(["cat sat on mat"], [["cat sat", "the cat sat on the mat"]])
    assert scores["ROUGE_L"] == pytest.approx(1.0)


def test_ptb_tokenisation_is_applied_before_rouge(scorer):
    # Case and punctuation do not count: the PTB tokenizer lowercases and coco-caption drops "." and ",".
    scores = scorer.score(["The cat, it sat."], [["the cat it sat"]])
    assert scores["ROUGE_L"] == pytest.approx(1.0)


def test_empty_output_is_scored(scorer):
    scores = scorer.score(["the cat sat on the mat", ""], [["the cat sat on the mat"], ["a dog barked"]])
    assert scores["ROUGE_L"] == pytest.approx(0.5)  # mean of 1 and 0


# --- files in the e2e-metrics format -------------------------------------------------------------------------------


def test_read_references_groups(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("ref 1a\nref 1b\n\nref 2a\n", encoding="utf-8")
    assert read_e2e_references(path) == [["ref 1a", "ref 1b"], ["ref 2a"]]


def test_read_references_windows_line_endings_and_trailing_blank_lines(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_bytes(b"ref 1a\r\nref 1b \r\n\r\nref 2a\r\nref 2b\r\n\r\n\r\n")
    assert read_e2e_references(path) == [["ref 1a", "ref 1b"], ["ref 2a", "ref 2b"]]


def test_read_references_rejects_an_empty_group(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("ref 1a\n\n\nref 2a\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3"):
        read_e2e_references(path)


def test_read_hypotheses(tmp_path):
    path = tmp_path / "hyps.txt"
    path.write_bytes(b"\xef\xbb\xbfout 1\r\n\r\nout 3\r\n")  # a BOM, and an empty output in the middle
    assert read_e2e_hypotheses(path) == ["out 1", "", "out 3"]


def test_missing_files_are_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_e2e_hypotheses(missing)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_e2e_references(missing)


def test_score_files_count_mismatch_names_counts_and_paths(tmp_path):
    hyps = tmp_path / "hyps.txt"
    refs = tmp_path / "refs.txt"
    hyps.write_text("a b c d\na b c d\na b c d\n", encoding="utf-8")
    refs.write_text("a b c d\na b\n\na b c d\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        score_e2e_files(hyps, refs, metrics=("BLEU",))
    message = str(info.value)
    assert "3 hypotheses" in message and "2 reference groups" in message
    assert str(hyps) in message and str(refs) in message


def test_score_files_single_reference_file(tmp_path):
    # Without blank lines the official scorer reads one reference per line (one per MR).
    hyps = tmp_path / "hyps.txt"
    refs = tmp_path / "refs.txt"
    hyps.write_text("the cat sat on the mat\na dog barked loudly at the mailman\n", encoding="utf-8")
    refs.write_text("the cat sat on the mat\na dog barked loudly at the mailman\n", encoding="utf-8")
    assert score_e2e_files(hyps, refs, metrics=("BLEU",)) == {"BLEU": pytest.approx(1.0)}


# --- smoke test on real references ---------------------------------------------------------------------------------


def _devset_groups(limit: int) -> list[list[str]]:
    devset = DATA_DIR / "e2e" / "devset.csv"
    if not devset.is_file():
        pytest.skip(f"E2E devset not found at {devset} (the shared data directory is absent)")
    groups: dict[str, list[str]] = {}
    with devset.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            groups.setdefault(row["mr"], []).append(row["ref"])
    return [refs for refs in groups.values() if len(refs) >= 2][:limit]


@needs_java
def test_devset_smoke(monkeypatch):
    groups = _devset_groups(20)
    assert len(groups) == 20
    hypotheses = [refs[0] for refs in groups]
    references = [refs[1:] for refs in groups]

    processes = []
    real_close = E2EScorer.close

    def spy_close(self):
        processes.append(self._meteor.meteor_p if self._meteor is not None else None)
        real_close(self)

    monkeypatch.setattr(E2EScorer, "close", spy_close)
    scores = score_e2e(hypotheses, references)

    assert list(scores) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    assert 0.3 < scores["BLEU"] < 1
    assert 3 < scores["NIST"] < 15
    assert 0.2 < scores["METEOR"] < 1
    assert 0.3 < scores["ROUGE_L"] < 1
    assert 0.5 < scores["CIDEr"] < 10
    # score_e2e closed the METEOR JVM it started.
    assert len(processes) == 1 and processes[0] is not None
    assert processes[0].poll() is not None
