"""GLUE metrics against values computed by hand on small literal arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kasa_peft.experiments.metrics.glue import GLUE_TASKS, PRIMARY_METRIC, compute_glue_metrics, primary_score

# One binary case for CoLA, MRPC and the accuracy tasks.
#   index:  0  1  2  3  4  5  6  7
PREDS = [1, 1, 0, 0, 1, 0, 1, 1]
LABELS = [1, 0, 0, 1, 1, 0, 1, 0]
# Confusion matrix (positive = 1): TP = {0, 4, 6} = 3, FP = {1, 7} = 2, FN = {3} = 1, TN = {2, 5} = 2.
TP, FP, FN, TN = 3, 2, 1, 2


def test_cola_matthews_correlation_by_hand():
    # MCC = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 − 2) / sqrt(5·4·4·3) = 4 / sqrt(240)
    expected = (TP * TN - FP * FN) / math.sqrt((TP + FP) * (TP + FN) * (TN + FP) * (TN + FN))
    assert expected == pytest.approx(4 / math.sqrt(240))
    result = compute_glue_metrics("cola", PREDS, LABELS)
    assert result == {"matthews_correlation": pytest.approx(0.2581988897, abs=1e-9)}


def test_cola_perfect_and_inverted():
    assert compute_glue_metrics("cola", [0, 1, 1, 0], [0, 1, 1, 0])["matthews_correlation"] == pytest.approx(1.0)
    assert compute_glue_metrics("cola", [1, 0, 0, 1], [0, 1, 1, 0])["matthews_correlation"] == pytest.approx(-1.0)


def test_mrpc_accuracy_f1_and_combined_by_hand():
    # accuracy = (TP + TN) / 8 = 5/8; precision = 3/5, recall = 3/4, F1 = 2TP / (2TP + FP + FN) = 6/9.
    result = compute_glue_metrics("mrpc", PREDS, LABELS)
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["combined"] == pytest.approx((5 / 8 + 2 / 3) / 2)
    assert set(result) == {"accuracy", "f1", "combined"}


@pytest.mark.parametrize("task", ["sst2", "rte", "qnli"])
def test_accuracy_tasks(task):
    assert compute_glue_metrics(task, PREDS, LABELS) == {"accuracy": pytest.approx(5 / 8)}


def test_stsb_pearson_and_spearman_by_hand():
    preds = [1.0, 2.0, 3.0, 10.0]
    gold = [1.0, 3.0, 2.0, 4.0]
    # Pearson: deviations from the means (4 and 2.5) are (−3, −2, −1, 6) and (−1.5, 0.5, −0.5, 1.5):
    #   Σxy = 4.5 − 1 + 0.5 + 9 = 13, Σx² = 9 + 4 + 1 + 36 = 50, Σy² = 5  →  r = 13 / sqrt(250).
    # Spearman: ranks (1, 2, 3, 4) and (1, 3, 2, 4): Σd² = 0 + 1 + 1 + 0 = 2  →  ρ = 1 − 6·2 / (4·15) = 0.8.
    result = compute_glue_metrics("stsb", np.array(preds), np.array(gold))
    assert result["pearson"] == pytest.approx(13 / math.sqrt(250))
    assert result["spearmanr"] == pytest.approx(0.8)
    assert result["combined"] == pytest.approx((13 / math.sqrt(250) + 0.8) / 2)


def test_stsb_accepts_a_regression_head_column():
    preds = np.array([[1.0], [2.0], [3.0], [10.0]])
    assert compute_glue_metrics("stsb", preds, [1.0, 3.0, 2.0, 4.0])["spearmanr"] == pytest.approx(0.8)


def test_task_names_are_normalised():
    assert compute_glue_metrics("SST-2", [1, 0], [1, 1]) == {"accuracy": 0.5}
    assert "pearson" in compute_glue_metrics("STS-B", [0.1, 0.5, 0.2], [0.0, 1.0, 0.5])


def test_values_are_plain_floats():
    for value in compute_glue_metrics("mrpc", np.array(PREDS), np.array(LABELS)).values():
        assert type(value) is float


def test_primary_metric_covers_every_task_and_is_returned():
    assert set(PRIMARY_METRIC) == set(GLUE_TASKS)
    for task in GLUE_TASKS:
        preds, gold = ([0.1, 0.9, 0.4], [0.0, 1.0, 0.5]) if task == "stsb" else (PREDS, LABELS)
        result = compute_glue_metrics(task, preds, gold)
        assert PRIMARY_METRIC[task] in result
        assert primary_score(task, result) == result[PRIMARY_METRIC[task]]


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown GLUE task 'mnli'"):
        compute_glue_metrics("mnli", [1], [1])


def test_length_mismatch():
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        compute_glue_metrics("sst2", [1, 0, 1], [1, 0])


def test_empty_input():
    with pytest.raises(ValueError, match="no predictions"):
        compute_glue_metrics("rte", [], [])


def test_logits_are_rejected_with_a_hint():
    with pytest.raises(ValueError, match="argmax"):
        compute_glue_metrics("sst2", np.zeros((4, 2)), [0, 1, 0, 1])
