"""KasaTrainer: the loss a Trainer step optimises includes the KaSA regulariser, once per optimiser step."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset
from transformers import TrainingArguments
from _factories import CASES

from kasa_peft import KasaConfig, KasaTrainer, get_kasa_model

LLAMA, BERT = CASES[0], CASES[2]


class _Tokens(Dataset):
    def __init__(self, n: int, classification: bool) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, 8), generator=generator)
        self.labels = torch.randint(0, 3, (n,), generator=generator) if classification else self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _args(tmp_path, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=0.1, optim="sgd", weight_decay=0.0,
        max_grad_norm=0.0, lr_scheduler_type="constant", max_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True,
    )
    defaults.update(overrides)
    return TrainingArguments(**defaults)


def _model(case, beta=0.5):
    return get_kasa_model(case.build(), KasaConfig(r=2, target_modules=case.target_modules, beta=beta, gamma=0.0,
                                                   modules_to_save=case.modules_to_save))


def test_compute_loss_adds_the_regulariser(tmp_path):
    model = _model(LLAMA)
    model.train()
    trainer = KasaTrainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(4, False))
    batch = {k: v.unsqueeze(0) for k, v in _Tokens(1, False)[0].items()}
    loss = trainer.compute_loss(model, batch)
    expected = model(**batch).loss + model.regularization_loss()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("case", [LLAMA, BERT], ids=["llama", "bert"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_one_sgd_step_applies_the_regulariser_gradient_once(tmp_path, case, accumulation):
    """With B = 0 the task loss gives σ no gradient, so one SGD step must give exactly σ ← σ·(1 − 2·lr·β)."""
    model = _model(case)
    sigma_before = {p: l.kasa_adapters["default"].sigma.detach().clone() for p, l in model.kasa_layers()}
    args = _args(tmp_path, gradient_accumulation_steps=accumulation)
    KasaTrainer(model=model, args=args, train_dataset=_Tokens(8, case is BERT)).train()
    for path, layer in model.kasa_layers():
        torch.testing.assert_close(layer.kasa_adapters["default"].sigma.detach(), sigma_before[path] * (1 - 2 * 0.1 * 0.5))


def test_checkpoints_and_resume_give_the_same_adapter(tmp_path):
    def run(output_dir, max_steps, resume=None):
        torch.manual_seed(0)
        model = _model(LLAMA, beta=1e-3)
        args = _args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=2, optim="adamw_torch",
                     learning_rate=1e-2, max_grad_norm=1.0)
        trainer = KasaTrainer(model=model, args=args, train_dataset=_Tokens(16, False))
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full", 4)
    partial_dir = tmp_path / "partial"
    run(partial_dir, 2)
    checkpoint = partial_dir / "checkpoint-2"
    assert (checkpoint / "kasa_config.json").is_file() and (checkpoint / "kasa_adapter.safetensors").is_file()
    resumed = run(partial_dir, 4, resume=str(checkpoint))
    for (path, a), (_, b) in zip(full.kasa_layers(), resumed.kasa_layers()):
        for name in ("lora_A", "lora_B", "sigma"):
            torch.testing.assert_close(getattr(a.kasa_adapters["default"], name), getattr(b.kasa_adapters["default"], name))


def test_trainer_refuses_a_model_without_adapters(tmp_path):
    with pytest.raises(TypeError, match="get_kasa_model"):
        KasaTrainer(model=LLAMA.build(), args=_args(tmp_path), train_dataset=_Tokens(2, False))


def test_checkpoints_are_marked_complete(tmp_path):
    from kasa_peft.trainer import COMPLETE_MARKER, last_complete_checkpoint

    model = _model(LLAMA)
    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    KasaTrainer(model=model, args=args, train_dataset=_Tokens(16, False)).train()
    assert (tmp_path / "checkpoint-4" / COMPLETE_MARKER).is_file()
    (tmp_path / "checkpoint-6").mkdir()  # what a kill in the middle of writing leaves behind
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


def test_evaluate_reports_loss_and_metrics(tmp_path):
    """Label names come from the wrapped model, so evaluation computes eval_loss and calls compute_metrics."""
    model = _model(BERT)
    seen = {}

    def compute_metrics(eval_pred):
        seen["n"] = len(eval_pred.label_ids)
        return {"accuracy": float((eval_pred.predictions.argmax(-1) == eval_pred.label_ids).mean())}

    trainer = KasaTrainer(model=model, args=_args(tmp_path), eval_dataset=_Tokens(6, True), compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and "eval_accuracy" in metrics and seen["n"] == 6
