"""The one shape every task family has: data, encoding, metrics, evaluation, presets.

The runner (``experiments/runner.py``), ``kasa eval`` and ``kasa compare`` only talk to a :class:`TaskFamily`; none of
them knows what GLUE or E2E is. A new family is one module that subclasses :class:`TaskFamily`, defines
``FAMILY = MyFamily()`` and is listed in ``tasks.FAMILY_MODULES``.

Life of a run, as the runner drives it::

    family = family_of(config.task)
    train_items = family.load_train(config)           # list[dict], already capped by config.train_limit
    eval_data   = family.load_eval(config)            # whatever family.evaluate consumes (dev split only)
    features    = family.encode(train_items, tokenizer, config)   # list[{"input_ids", "labels", ...}]
    ... Trainer(data_collator=family.collator(tokenizer), compute_metrics=family.compute_metrics(config),
                compute_loss_func=family.loss_function(config)) ...
    metrics     = family.evaluate(model, tokenizer, config, eval_data, out_dir)   # {name: float}

Presets: ``PRESETS[name][task]`` (or ``PRESETS[name]["*"]`` for every task of the family) is a mapping of
``RunConfig`` field names to values; a per-task entry is laid over the ``"*"`` entry. Every number carries a comment
naming its source. ``experiments/presets.py`` resolves them and reports unknown names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from ..runconfig import RunConfig


class TaskFamily:
    """Base class of the task families; subclasses override the data and evaluation methods."""

    #: Family name as recorded in reports ("glue", "e2e", ...).
    name: ClassVar[str] = ""
    #: "classification" (sequence-classification head) or "causal" (LM head, generation).
    kind: ClassVar[str] = "causal"
    #: The ``--task`` values this family answers to.
    tasks: ClassVar[tuple[str, ...]] = ()
    #: Whether the Trainer evaluates ``trainer_eval_items`` every epoch (best epoch then comes from those evaluations).
    eval_during_training: ClassVar[bool] = False
    #: ``{preset name: {task or "*": {RunConfig field: value}}}``.
    PRESETS: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}

    # ------------------------------------------------------------------ description
    def num_labels(self, task: str) -> int:
        """Outputs of the classification head (1 = regression); 0 for causal families."""
        return 0

    def primary_metric(self, config: "RunConfig") -> str:
        raise NotImplementedError

    def notes(self, config: "RunConfig") -> list[str]:
        """Lines about the protocol that every report of this run must carry (e.g. a stand-in split)."""
        return []

    # ------------------------------------------------------------------ data
    def load_train(self, config: "RunConfig") -> list[dict]:
        raise NotImplementedError

    def load_eval(self, config: "RunConfig") -> Any:
        """The evaluation data of the task's dev/test split (only that split is read)."""
        raise NotImplementedError

    def load_eval_file(self, config: "RunConfig", path: Path) -> Any:
        """Evaluation data from a user's labelled file (``kasa eval --eval-file``), same type as :meth:`load_eval`."""
        raise ValueError(f"--eval-file is not supported for task {config.task!r}")

    def encode(self, items: list[dict], tokenizer, config: "RunConfig") -> list[dict]:
        raise NotImplementedError

    def collator(self, tokenizer) -> Callable:
        raise NotImplementedError

    # ------------------------------------------------------------------ training hooks
    def trainer_eval_items(self, eval_data: Any) -> list[dict] | None:
        """Raw items the Trainer evaluates every epoch (``eval_during_training`` families), else ``None``."""
        return None

    def compute_metrics(self, config: "RunConfig") -> Callable | None:
        """``compute_metrics`` for the Trainer's per-epoch evaluation, or ``None``."""
        return None

    def loss_function(self, config: "RunConfig") -> Callable | None:
        """A Trainer ``compute_loss_func`` (e.g. label smoothing), or ``None`` for the model's own loss."""
        return None

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model, tokenizer, config: "RunConfig", eval_data: Any, out_dir: Path) -> dict[str, float]:
        """Metrics of ``model`` on ``eval_data``; files (hypotheses, answers) go to ``out_dir``."""
        raise NotImplementedError
