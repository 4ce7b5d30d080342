"""GLUE dev-set metrics, as the GLUE benchmark (and Hugging Face's ``glue`` metric) defines them.

========  =======================================  ==================================================
task      metrics returned                         definition
========  =======================================  ==================================================
``cola``  ``matthews_correlation``                 Matthews correlation coefficient (sklearn), [-1, 1]
``sst2``  ``accuracy``                             fraction of correct labels
``mrpc``  ``accuracy``, ``f1``, ``combined``       F1 of the positive class (label 1 = paraphrase);
                                                   ``combined`` = (accuracy + f1) / 2
``stsb``  ``pearson``, ``spearmanr``, ``combined`` Pearson / Spearman correlation of float scores
                                                   (scipy), [-1, 1]; ``combined`` = their mean
``rte``   ``accuracy``
``qnli``  ``accuracy``
========  =======================================  ==================================================

Every value is a plain ``float`` on a 0–1 scale (correlations on -1–1), never a percentage. The formulas are
scikit-learn's and scipy's, so edge cases behave as there: a constant prediction vector gives a Matthews
correlation of 0.0, and a Pearson/Spearman correlation of ``nan`` (scipy warns; it is undefined).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "rte", "qnli")

#: The metric each task is ranked by (the one the KaSA paper's GLUE table reports).
PRIMARY_METRIC: dict[str, str] = {
    "cola": "matthews_correlation",
    "sst2": "accuracy",
    "mrpc": "accuracy",
    "stsb": "pearson",
    "rte": "accuracy",
    "qnli": "accuracy",
}

_REGRESSION_TASKS = frozenset({"stsb"})


def normalize_task_name(task: str) -> str:
    """``"SST-2"``, ``"sst_2"`` and ``"sst2"`` all name ``"sst2"``; ``ValueError`` for a task not in GLUE_TASKS."""
    key = str(task).strip().lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}: expected one of {', '.join(GLUE_TASKS)}")
    return key


def _as_1d(values: Any, what: str, task: str) -> np.ndarray:
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    if array.ndim == 2 and array.shape[1] == 1:  # a regression head's (n, 1) output
        array = array[:, 0]
    if array.ndim != 1:
        hint = "" if task in _REGRESSION_TASKS else " (for logits, pass logits.argmax(-1))"
        raise ValueError(f"{task}: {what} must be one value per example, got shape {array.shape}{hint}")
    return array


def compute_glue_metrics(task: str, predictions: Any, references: Any) -> dict[str, float]:
    """Score ``predictions`` against gold ``references`` for one GLUE task; see the module docstring for the table.

    ``predictions``/``references`` are 1-D sequences (lists, NumPy arrays or tensors): integer labels for the
    classification tasks, float similarity scores for ``stsb``. Raises ``ValueError`` for an unknown task, a length
    mismatch, an empty input or a non-1-D array.
    """
    name = normalize_task_name(task)
    preds = _as_1d(predictions, "predictions", name)
    refs = _as_1d(references, "references", name)
    if len(preds) != len(refs):
        raise ValueError(f"{name}: {len(preds)} predictions but {len(refs)} references")
    if len(preds) == 0:
        raise ValueError(f"{name}: no predictions to score")

    if name in _REGRESSION_TASKS:
        preds, refs = preds.astype(np.float64), refs.astype(np.float64)
        pearson = float(pearsonr(preds, refs)[0])
        spearman = float(spearmanr(preds, refs)[0])
        return {"pearson": pearson, "spearmanr": spearman, "combined": (pearson + spearman) / 2}

    if name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(refs, preds))}
    accuracy = float(accuracy_score(refs, preds))
    if name == "mrpc":
        f1 = float(f1_score(refs, preds, pos_label=1, average="binary", zero_division=0.0))
        return {"accuracy": accuracy, "f1": f1, "combined": (accuracy + f1) / 2}
    return {"accuracy": accuracy}


def primary_score(task: str, metrics: dict[str, float]) -> float:
    """The task's :data:`PRIMARY_METRIC` value from a :func:`compute_glue_metrics` result (``nan`` if absent)."""
    return float(metrics.get(PRIMARY_METRIC[normalize_task_name(task)], math.nan))
