"""Experiment harness: data, training, evaluation and reporting for the KaSA paper reproductions."""
