"""TRL integration: ``KasaSFTTrainer`` = TRL's ``SFTTrainer`` with KaSA's regulariser in the loss.

It is :class:`kasa_peft.trainer.KasaTrainer` placed in front of ``trl.SFTTrainer`` in the MRO, so the loss is
``SFT loss + KasaModel.regularization_loss()`` — added once per optimiser step whatever the gradient accumulation
(see :class:`kasa_peft.trainer.RegularizedTrainerMixin`) — and checkpoints hold the KaSA adapter. Everything else
(dataset formatting, chat templates, completion-only loss, packing, metrics) is TRL's::

    from kasa_peft import KasaConfig, get_kasa_model
    from kasa_peft.trl import KasaSFTTrainer
    trainer = KasaSFTTrainer(model=get_kasa_model(model, KasaConfig(r=8)), args=SFTConfig(...),
                             train_dataset=dataset, processing_class=tokenizer)

Do not pass ``peft_config``: the model already carries its KaSA adapter.
"""

from __future__ import annotations

try:
    from trl import SFTTrainer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError('kasa_peft.trl needs TRL: pip install "kasa-peft[trl]"') from error

from .trainer import KasaTrainer

__all__ = ["KasaSFTTrainer"]


class _SFTOutputsOnDemand(SFTTrainer):
    """Asks SFTTrainer for the model outputs only when the Trainer's caller wants them.

    ``RegularizedTrainerMixin`` always requests ``return_outputs=True`` from the loss below it; SFTTrainer's fused
    LM head does not build logits, so it would pay a second forward pass per training step to return them.
    """

    _caller_wants_outputs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not return_outputs:  # a plain loss request (e.g. KasaTrainer's once-per-run normalisation measurement)
            return super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
        wanted = self._caller_wants_outputs
        result = super().compute_loss(model, inputs, return_outputs=wanted, num_items_in_batch=num_items_in_batch)
        return result if wanted else (result, None)


class KasaSFTTrainer(KasaTrainer, _SFTOutputsOnDemand):
    """``trl.SFTTrainer`` training a ``KasaModel`` with the KaSA regulariser in the loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._caller_wants_outputs = return_outputs
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("peft_config") is not None:
            raise ValueError(
                "KasaSFTTrainer trains the KaSA adapter already on the model; drop peft_config (wrap the model with "
                "kasa_peft.get_kasa_model instead)."
            )
        super().__init__(*args, **kwargs)
        self._move_fused_lm_head_inside()

    def _move_fused_lm_head_inside(self) -> None:
        """SFTTrainer patches a fused LM-head forward onto the model it is given unless that is a PeftModel; on a
        KasaModel it would look up ``.base_model`` (ours: the whole wrapped LM, not its backbone). Put the patch on the
        wrapped transformers model instead, where PEFT models get it."""
        from trl.trainer.utils import add_fused_lm_head

        from .trainer import find_kasa_model

        kasa_model = find_kasa_model(self.model)
        if "forward" in vars(kasa_model):  # the instance-level patch; KasaModel.forward passes everything through
            del kasa_model.forward
            add_fused_lm_head(kasa_model.base_model, outputs=("log_probs", "entropy", "is_top1"))

    # SFTTrainer's dataset preparation keeps its own columns (input_ids, labels, seq_lengths, completion masks):
    # its choice, not KasaTrainer's base-model signature, decides what survives column pruning.
    _set_signature_columns_if_needed = SFTTrainer._set_signature_columns_if_needed
