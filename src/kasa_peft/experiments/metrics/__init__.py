"""Evaluation metrics of the experiment harness: GLUE (:mod:`.glue`) and the E2E NLG Challenge (:mod:`.e2e`)."""

from .e2e import (
    E2E_METRICS,
    E2EScorer,
    mteval_bleu,
    mteval_nist,
    mteval_tokenize,
    ptb_tokenize,
    read_e2e_hypotheses,
    read_e2e_references,
    score_e2e,
    score_e2e_files,
)
from .glue import GLUE_TASKS, PRIMARY_METRIC, compute_glue_metrics, normalize_task_name, primary_score

__all__ = [
    "E2E_METRICS",
    "GLUE_TASKS",
    "PRIMARY_METRIC",
    "E2EScorer",
    "compute_glue_metrics",
    "mteval_bleu",
    "mteval_nist",
    "mteval_tokenize",
    "normalize_task_name",
    "primary_score",
    "ptb_tokenize",
    "read_e2e_hypotheses",
    "read_e2e_references",
    "score_e2e",
    "score_e2e_files",
]
