"""`kasa train --quantize 4bit`: the harness loads the base through BitsAndBytesConfig, trains KaSA on it, and a
freshly quantised base accepts the saved adapter (`kasa eval`)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from kasa_peft.experiments.cli import app
from kasa_peft.experiments.models import minilm_dir

pytest.importorskip("bitsandbytes", reason='bitsandbytes is not installed: pip install "kasa-peft[quant]"')
runner = CliRunner()


def _save_llama_with_tokenizer(directory):
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tokenizer.eos_token = tokenizer.sep_token
    torch.manual_seed(0)
    # Sizes are multiples of 64 (bitsandbytes' 4-bit block; its CPU inference kernel needs that).
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_kasa_train_quantize_4bit_then_eval(tmp_path):
    model_dir = _save_llama_with_tokenizer(tmp_path / "llama")
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", "--task", "sst2", "--demo-data", "--model", str(model_dir), "--quantize", "4bit",
                                 "--train-limit", "16", "--eval-limit", "8", "--batch-size", "4", "--max-length", "32",
                                 "--max-steps", "2", "--output-dir", str(run_dir)])
    assert result.exit_code == 0, result.output[-3000:]
    record = json.loads((run_dir / "config.json").read_text())
    assert record["quantize"] == "4bit"
    assert json.loads((run_dir / "result.json").read_text())["global_step"] == 2
    # `kasa eval` re-quantises the base the same way; the fingerprint check must accept it.
    result = runner.invoke(app, ["eval", str(run_dir)])
    assert result.exit_code == 0, result.output[-3000:]


@pytest.mark.parametrize(("args", "message"), [(["--quantize", "3bit"], "'4bit' or '8bit'"),
                                               (["--quantize", "4bit", "--method", "peft-kasa"], "plain LoRA")])
def test_bad_quantize_flags_are_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["train", "--task", "sst2", "--demo-data", "--model", "tiny-bert", *args,
                                 "--output-dir", str(tmp_path / "x")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
