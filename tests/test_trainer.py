"""KasaTrainer: the loss a Trainer step optimises includes the KaSA regulariser, once per optimiser step."""

from __future__ import annotations

import copy
from pathlib import Path

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


def _model(case, beta=0.5, gamma=0.0):
    return get_kasa_model(case.build(), KasaConfig(r=2, target_modules=case.target_modules, beta=beta, gamma=gamma,
                                                   modules_to_save=case.modules_to_save))


def _perturb(model) -> None:
    """B ≠ 0 (zero at init), so the task loss moves σ and A too."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in model.kasa_layers():
            adapter = layer.kasa_adapters["default"]
            adapter.lora_B.copy_(0.3 * torch.randn(adapter.lora_B.shape, generator=generator))


def test_compute_loss_adds_the_regulariser(tmp_path):
    model = _model(LLAMA)
    model.train()
    trainer = KasaTrainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(4, False))
    batch = {k: v.unsqueeze(0) for k, v in _Tokens(1, False)[0].items()}
    loss = trainer.compute_loss(model, batch)
    expected = model(**batch).loss + model.regularization_loss()
    torch.testing.assert_close(loss, expected)


class _PlainRegressor(torch.nn.Module):
    """A forward without **kwargs that averages its own loss: the Trainer divides it by the accumulation steps."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = torch.nn.Linear(12, 20)
        self.lin1 = torch.nn.Linear(20, 3)

    def forward(self, x, labels=None):
        logits = self.lin1(torch.relu(self.lin0(x)))
        return {"loss": (logits - labels).square().mean(), "logits": logits}


class _Vectors(Dataset):
    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 12, generator=generator), torch.randn(n, 3, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _sum_ce_over_items(outputs, labels, num_items_in_batch):
    """A compute_loss_func normalised over the accumulated batch, as the Trainer's contract asks."""
    return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch


def _bert_task(model, batch, n_items):
    return model(**batch).loss  # mean over the micro-batch, whatever num_items_in_batch says


def _llama_task(model, batch, n_items):
    return model(**batch, num_items_in_batch=n_items).loss  # sum over tokens / n_items


def _plain_task(model, batch, n_items):
    return model(**batch)["loss"]


def _func_task(model, batch, n_items):
    return _sum_ce_over_items(model(input_ids=batch["input_ids"]), batch["labels"], n_items)


# (model kind, builder, data, task loss of one micro-batch, how the Trainer normalises the step, compute_loss_func)
#   "per-micro-batch": Trainer does not divide, loss is a per-micro-batch mean → step = Σ_i (task_i + reg)
#   "accumulated":     loss normalised over the accumulated batch           → step = Σ_i task_i + reg
#   "divided":         Trainer divides by k                                 → step = (1/k) Σ_i (task_i + reg)
GA_CASES = {
    "bert-kwargs-averages-itself": (lambda: _model(BERT, gamma=0.1), lambda: _Tokens(2, True), _bert_task, "per-micro-batch", None),
    "llama-consumes-num-items": (lambda: _model(LLAMA, gamma=0.1), lambda: _Tokens(2, False), _llama_task, "accumulated", None),
    "plain-forward": (
        lambda: get_kasa_model(_PlainRegressor(), KasaConfig(r=2, target_modules=["lin0", "lin1"], beta=0.5, gamma=0.1)),
        lambda: _Vectors(2), _plain_task, "divided", None,
    ),
    "bert-compute-loss-func": (lambda: _model(BERT, gamma=0.1), lambda: _Tokens(2, True), _func_task, "accumulated", _sum_ce_over_items),
}


@pytest.mark.parametrize("kind", list(GA_CASES))
def test_gradient_accumulation_gives_the_regulariser_the_task_losss_normalisation(tmp_path, kind):
    """One SGD step over k = 2 micro-batches of one item equals p − lr·∇(reference step loss), computed by hand.

    B ≠ 0 and γ > 0, so the task loss and both penalties all move A, B and σ."""
    build, data, task, normalisation, loss_func = GA_CASES[kind]
    lr, steps = 0.1, 2
    model = build()
    _perturb(model)
    reference = copy.deepcopy(model)
    dataset = data()
    batches = [{k: v.unsqueeze(0) for k, v in dataset[i].items()} for i in range(steps)]
    labels = [b["labels"] for b in batches]
    shifted = normalisation == "accumulated" and kind.startswith("llama")
    n_items = sum(int((y[..., 1:] if shifted else y).ne(-100).sum()) for y in labels)

    reference.train()
    tasks = [task(reference, batch, n_items) for batch in batches]
    reg = reference.regularization_loss()
    step_loss = {
        "per-micro-batch": sum(tasks) + steps * reg,
        "accumulated": sum(tasks) + reg,
        "divided": (sum(tasks) + steps * reg) / steps,
    }[normalisation]
    step_loss.backward()
    expected = {n: (p - lr * p.grad).detach() for n, p in reference.named_parameters() if p.requires_grad}

    args = _args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=steps, learning_rate=lr)
    KasaTrainer(model=model, args=args, train_dataset=dataset, compute_loss_func=loss_func).train()
    got = dict(model.named_parameters())
    assert expected
    for name, value in expected.items():
        torch.testing.assert_close(got[name].detach(), value, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoints_and_resume_give_the_same_adapter(tmp_path, monkeypatch):
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
    # The only pickled files are the Trainer's own optimizer/scheduler/RNG states (README: Trainer checkpoints).
    pickled = {p.name for p in checkpoint.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl")}
    assert pickled == {"optimizer.pt", "scheduler.pt", "rng_state.pth"}, pickled
    loads = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        loads.append((Path(f).name, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    resumed = run(partial_dir, 4, resume=str(checkpoint))
    # transformers reads each of them back with torch.load(..., weights_only=True): no arbitrary unpickling.
    assert {name for name, _ in loads} == pickled and all(weights_only is True for _, weights_only in loads), loads
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


@pytest.mark.parametrize("scaled, share", [(True, 0.5), (False, 1.0)])
def test_an_explicit_loss_is_scaled_for_ga_decides_the_share(tmp_path, scaled, share):
    """A subclass that sets loss_is_scaled_for_ga overrides the measurement, as it overrides Trainer.training_step."""
    model = _model(BERT)
    trainer = KasaTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=_Tokens(4, True))
    trainer.loss_is_scaled_for_ga = scaled
    batch = {k: v.unsqueeze(0) for k, v in _Tokens(1, True)[0].items()}
    model.train()
    assert trainer._regularizer_share(model, batch, num_items_in_batch=torch.tensor(2)) == share
    assert trainer._task_loss_follows_num_items is None, "no measurement when the subclass says"
