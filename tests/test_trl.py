"""TRL's SFTTrainer with a KaSA model: the regulariser is in the loss exactly once per optimiser step."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback

from kasa_peft import KasaConfig, get_kasa_model
from kasa_peft.experiments.models import minilm_dir

pytest.importorskip("trl", reason='TRL is not installed: pip install "kasa-peft[trl]"')
datasets = pytest.importorskip("datasets", reason="datasets (a TRL dependency) is not installed")
from trl import SFTConfig  # noqa: E402

from kasa_peft.trl import KasaSFTTrainer  # noqa: E402


def _tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tokenizer.eos_token = tokenizer.sep_token
    return tokenizer


def _model(tokenizer, beta: float):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    model = get_kasa_model(LlamaForCausalLM(config), KasaConfig(r=2, target_modules=["q_proj", "v_proj"], beta=beta, gamma=0.0))
    with torch.no_grad():  # B ≠ 0 so that σ gets a task gradient as well
        for _, layer in model.kasa_layers():
            layer.kasa_adapters["default"].lora_B.normal_(0, 0.1)
    return model


class _GradientAtStep(TrainerCallback):
    """Records σ and its accumulated gradient right before the first optimiser step."""

    def __init__(self, model):
        self.model, self.sigma, self.grad = model, None, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grad is None:
            sigmas = [layer.kasa_adapters["default"].sigma for _, layer in self.model.kasa_layers()]
            self.sigma = torch.cat([s.detach().clone() for s in sigmas])
            self.grad = torch.cat([s.grad.detach().clone() for s in sigmas])


def _first_step_gradient(tmp_path, beta: float, accumulation: int):
    tokenizer = _tokenizer()
    model = _model(tokenizer, beta)
    dataset = datasets.Dataset.from_dict({"text": [f"the number {i} is {'even' if i % 2 == 0 else 'odd'}" for i in range(8)]})
    args = SFTConfig(output_dir=str(tmp_path / f"sft-{beta}-{accumulation}"), per_device_train_batch_size=2,
                     gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1e-3, report_to=[],
                     save_strategy="no", use_cpu=True, seed=0, data_seed=0, max_length=16, disable_tqdm=True,
                     logging_steps=1, max_grad_norm=0.0)  # no clipping: compare raw gradients
    recorder = _GradientAtStep(model)
    recorder.backbone_calls = 0
    recorder.measurement_calls = 0

    def count(module, _):
        # Eval-mode passes are KasaTrainer's once-per-run, no-grad check of the loss normalisation (accumulation > 1).
        if module.training:
            recorder.backbone_calls += 1
        else:
            recorder.measurement_calls += 1

    model.base_model.model.register_forward_pre_hook(count)
    trainer = KasaSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[recorder])
    trainer.train()
    return recorder, trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_sft_loss_carries_the_regulariser_once_per_optimiser_step(tmp_path, accumulation):
    beta = 0.5
    plain, _ = _first_step_gradient(tmp_path, 0.0, accumulation)
    regularised, trainer = _first_step_gradient(tmp_path, beta, accumulation)
    torch.testing.assert_close(regularised.sigma, plain.sigma)
    # d/dσ of β·Σσ² is 2βσ, once — added per micro-batch it would be `accumulation` times that.
    torch.testing.assert_close(regularised.grad - plain.grad, 2 * beta * plain.sigma, atol=1e-5, rtol=1e-4)
    assert any("reg_loss" in entry for entry in trainer.state.log_history)
    # One forward per micro-batch: no extra pass to rebuild logits the training loss does not need.
    assert regularised.backbone_calls == accumulation
    assert regularised.measurement_calls == (2 if accumulation > 1 else 0)


def test_peft_config_is_refused(tmp_path):
    from peft import LoraConfig

    tokenizer = _tokenizer()
    with pytest.raises(ValueError, match="drop peft_config"):
        KasaSFTTrainer(model=_model(tokenizer, 0.0), args=SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                       peft_config=LoraConfig(r=2), processing_class=tokenizer)
