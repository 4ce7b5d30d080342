"""``transformers.Trainer`` integration: the KaSA regulariser is part of the optimised loss, no loop to write."""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import can_return_loss, find_labels

from .checkpoint import WEIGHTS_NAME, atomic_write_text
from .config import CONFIG_NAME
from .model import KasaModel


def find_kasa_model(model: nn.Module) -> KasaModel | None:
    """The ``KasaModel`` inside ``model`` (itself, or under DDP/FSDP/compile wrappers), else ``None``."""
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, KasaModel):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        seen += 1
    return None


COMPLETE_MARKER = "checkpoint_complete.json"


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` under ``output_dir`` that was written to the end (has the completion marker).

    A run killed while writing a checkpoint leaves a folder without the marker; resuming must skip it.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    complete = [
        path
        for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if path.is_dir() and (path / COMPLETE_MARKER).is_file() and path.name.split("-")[-1].isdigit()
    ]
    return max(complete, key=lambda path: int(path.name.split("-")[-1]), default=None)


class RegularizedTrainerMixin:
    """Adds ``regularization_term(model)`` to the training loss with exactly the task loss's normalisation, logs it,
    and marks checkpoints complete. Mix in before ``transformers.Trainer``.

    Gradient accumulation over k micro-batches: the Trainer backpropagates ``c·task_i`` for micro-batch i, and we
    make that ``c·(task_i + s·reg)``, with s chosen so that β and γ weigh against the task loss as without
    accumulation, in each branch of ``Trainer.compute_loss`` / ``training_step``:

    * the Trainer divides by k (``c = 1/k``; a plain forward, no ``num_items_in_batch``): ``s = 1``, so a step
      optimises mean task + reg;
    * the Trainer does not divide and the task loss is normalised over the whole accumulated batch (a model that
      consumes ``num_items_in_batch``, a ``compute_loss_func``, the label smoother, or ``loss_is_scaled_for_ga``
      set to True): ``s = 1/k``, so the k shares add up to one reg;
    * the Trainer does not divide but the task loss is a per-micro-batch mean anyway (a forward that takes
      ``**kwargs`` and ignores ``num_items_in_batch``, e.g. BERT classifiers in transformers 5): ``s = 1``, so a
      step optimises k·(mean task + reg), as the Trainer does for the task loss alone.

    Which of the last two holds is measured once per Trainer, on the first accumulated micro-batch: the task loss is
    recomputed twice without gradients in eval mode, with ``num_items_in_batch`` and with twice it; a loss
    normalised over the accumulated batch halves. (Two extra forward passes per run, only with k > 1.)
    """

    _reg_sum = 0.0
    _reg_count = 0
    # None until measured: does the task loss scale with 1 / num_items_in_batch?
    _task_loss_follows_num_items: bool | None = None

    def regularization_term(self, model) -> torch.Tensor | None:  # pragma: no cover - overridden
        return None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        reg = self.regularization_term(model) if model.training else None
        # Decided before the task loss: Trainer.compute_loss pops "labels" from `inputs`, the measurement needs them.
        share = self._regularizer_share(model, inputs, num_items_in_batch) if reg is not None else 1.0
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if reg is not None:
            reg = reg.to(loss.device)
            self._reg_sum += float(reg.detach())
            self._reg_count += 1
            loss = loss + (reg * share).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _trainer_divides_by_accumulation(self, num_items_in_batch) -> bool:
        # Trainer.training_step's own decision (transformers 5), read from the same attributes.
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return not explicit
        skips = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        return not skips

    def _regularizer_share(self, model, inputs, num_items_in_batch) -> float:
        """s in the class docstring: the fraction of the regulariser added to this micro-batch's loss."""
        # Set by Trainer's training loop (smaller for a last, partial accumulation); absent in a bare compute_loss call.
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if steps == 1 or self._trainer_divides_by_accumulation(num_items_in_batch):
            return 1.0
        if getattr(self, "loss_is_scaled_for_ga", None):
            return 1.0 / steps  # the user says the task loss is normalised over the accumulated batch
        if num_items_in_batch is None:
            return 1.0  # nothing to normalise over: a per-micro-batch loss the Trainer does not divide
        if self._task_loss_follows_num_items is None:
            self._task_loss_follows_num_items = self._measure_num_items_dependence(model, inputs, num_items_in_batch)
        # Still undecided (no labelled item yet): this micro-batch's task loss is zero, take the 1/k share.
        return 1.0 if self._task_loss_follows_num_items is False else 1.0 / steps

    def _measure_num_items_dependence(self, model, inputs, num_items_in_batch) -> bool | None:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                # dict(...): Trainer.compute_loss pops "labels" from the dict it is given.
                once = super().compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
                twice = super().compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch * 2)
        finally:
            model.train(was_training)
        once, twice = float(once.detach().float().mean()), float(twice.detach().float().mean())
        if once == 0.0 or not math.isfinite(once):
            return None  # undecidable on this micro-batch (no labelled item); measure again on the next one
        if math.isclose(twice, once / 2, rel_tol=1e-3):
            return True
        if not math.isclose(twice, once, rel_tol=1e-3):
            warnings.warn(
                f"KasaTrainer: the task loss neither halves nor stays when num_items_in_batch doubles ({once:g} → "
                f"{twice:g}); treating it as normalised over the accumulated batch. Set trainer.loss_is_scaled_for_ga "
                "to say which it is.",
                stacklevel=2,
            )
            return True
        return False

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._reg_count and "loss" in logs:
            logs = {**logs, "reg_loss": self._reg_sum / self._reg_count}
            self._reg_sum, self._reg_count = 0.0, 0
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.is_dir():
            # Written last and atomically: its presence means every file of the checkpoint is complete.
            atomic_write_text(folder / COMPLETE_MARKER, json.dumps({"global_step": self.state.global_step}))


class KasaTrainer(RegularizedTrainerMixin, Trainer):
    """A ``Trainer`` whose training loss is ``task loss + KasaModel.regularization_loss()``.

    Checkpoints hold the adapter (``kasa_config.json`` + ``kasa_adapter.safetensors``) and a completion marker
    (see :func:`last_complete_checkpoint`); ``resume_from_checkpoint`` restores the adapter. The mean regulariser
    since the last log is logged as ``reg_loss``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        kasa_model = find_kasa_model(self.model)
        if kasa_model is None:
            raise TypeError("KasaTrainer needs a KasaModel; wrap your model with kasa_peft.get_kasa_model first.")
        # The Trainer reads label names and loss support off the model class; KasaModel's forward is (*args, **kwargs).
        base_class = kasa_model.base_model.__class__
        if self.args.label_names is None:
            self.label_names = find_labels(base_class)
        self.can_return_loss = can_return_loss(base_class)

    def regularization_term(self, model) -> torch.Tensor | None:
        return find_kasa_model(model).regularization_loss()

    def _set_signature_columns_if_needed(self) -> None:
        # Column pruning must look at the wrapped model's forward, not KasaModel's (*args, **kwargs).
        if self._signature_columns is None:
            base = find_kasa_model(self.model).base_model
            self._signature_columns = list(inspect.signature(base.forward).parameters)
            self._signature_columns += list({"label", "label_ids", *self.label_names})

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        find_kasa_model(self.model).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        # JSON rather than the Trainer's pickled training_args.bin: nothing we write needs unpickling to read.
        Path(output_dir, "training_args.json").write_text(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        kasa_model = find_kasa_model(model if model is not None else self.model)
        path = Path(resume_from_checkpoint)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a KasaTrainer checkpoint (missing {CONFIG_NAME} / {WEIGHTS_NAME}).")
        load_adapter_weights_(kasa_model, path, kasa_model.active_adapter)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best:
            load_adapter_weights_(find_kasa_model(self.model), Path(best), find_kasa_model(self.model).active_adapter)


def load_adapter_weights_(kasa_model: KasaModel, path: Path, adapter_name: str) -> None:
    """Overwrite an existing adapter's tensors in place from a ``save_pretrained`` directory (used on resume)."""
    from . import checkpoint

    tensors, _ = checkpoint.load_tensors(path / WEIGHTS_NAME)
    kasa_model._load_adapter_tensors(adapter_name, tensors, assign=False, source=path)
