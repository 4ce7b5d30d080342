"""Serving path: `kasa export --format lora` writes a rank-2r PEFT LoRA that reproduces the KaSA model on the untouched
base (Conv1D through GPT-2, a 4-bit base through bitsandbytes), loaded by PEFT with no KaSA code."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from kasa_peft import KasaConfig, KasaModel, export_peft_checkpoint, get_kasa_model
from kasa_peft.experiments.cli import app
from kasa_peft.experiments.models import minilm_dir

runner = CliRunner()


def _randomize_adapters(model: KasaModel) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in model.kasa_layers():
            adapter = layer.kasa_adapters["default"]
            adapter.lora_B.copy_(0.1 * torch.randn(adapter.lora_B.shape, generator=generator))


def _inputs() -> dict:
    return {"input_ids": torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))}


def _save_gpt2(directory):
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(directory)  # load_model wants a tokenizer
    return directory


def test_cli_export_of_a_conv1d_model_reproduces_kasa_logits_in_peft(tmp_path):
    base_dir = _save_gpt2(tmp_path / "gpt2")
    kasa = get_kasa_model(AutoModelForCausalLM.from_pretrained(base_dir).eval(),
                          KasaConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc", "c_proj"]))
    _randomize_adapters(kasa)
    kasa.save_pretrained(tmp_path / "adapter")
    inputs = _inputs()
    with torch.no_grad():
        expected = kasa(**inputs).logits

    result = runner.invoke(app, ["export", str(tmp_path / "adapter"), str(tmp_path / "lora"), "--model", str(base_dir)])
    assert result.exit_code == 0, result.output
    peft_config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert peft_config["r"] == 6 and peft_config["lora_alpha"] == 6 and peft_config["fan_in_fan_out"]  # rank 2r
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), str(tmp_path / "lora"))
    with torch.no_grad():
        torch.testing.assert_close(served(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        # Not vacuous: the adapter moves the logits well beyond that tolerance.
        assert (expected - AutoModelForCausalLM.from_pretrained(base_dir)(**inputs).logits).abs().max() > 1e-2


def test_export_bad_source_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "neither a KaSA adapter directory" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["export", str(tmp_path), str(tmp_path / "out"), "--format", "gguf"])
    assert result.exit_code == 2 and "--format" in result.output


def test_lora_export_of_a_4bit_model_serves_on_quantised_and_full_precision_bases(tmp_path):
    pytest.importorskip("bitsandbytes", reason='bitsandbytes is not installed: pip install "kasa-peft[quant]"')
    from _quantized import TARGETS, load_quantized, save_tiny_llama

    base_dir = save_tiny_llama(tmp_path / "llama")
    inputs = _inputs()
    kasa = get_kasa_model(load_quantized(base_dir, "nf4"), KasaConfig(r=3, lora_alpha=6, target_modules=TARGETS))
    _randomize_adapters(kasa)
    with torch.no_grad():
        expected = kasa(**inputs).logits
        with kasa.disable_adapter():
            quantised_base = kasa(**inputs).logits
    with pytest.raises(ValueError, match="format='lora'"):  # PEFT's KaSA would apply plain LoRA on bnb layers
        export_peft_checkpoint(kasa, tmp_path / "kasa", format="kasa")
    export_peft_checkpoint(kasa, tmp_path / "lora", format="lora")

    on_4bit = PeftModel.from_pretrained(load_quantized(base_dir, "nf4"), str(tmp_path / "lora")).eval()
    full = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        full_base = full(**inputs).logits
        on_full = PeftModel.from_pretrained(full, str(tmp_path / "lora")).eval()(**inputs).logits
        on_4bit_logits = on_4bit(**inputs).logits
    # Same quantised base: only float32 round-off between PEFT's and our adapter arithmetic.
    torch.testing.assert_close(on_4bit_logits, expected, atol=1e-4, rtol=1e-4)
    # Full-precision base: off by the base's own quantisation noise, not more (and far from "no adapter").
    quantisation_noise = (full_base - quantised_base).norm()
    assert (on_full - expected).norm() <= 1.5 * quantisation_noise
    assert (on_full - full_base).norm() > 3 * quantisation_noise


def test_cli_export_never_writes_into_a_users_folder_and_replaces_only_its_own(tmp_path):
    base_dir = _save_gpt2(tmp_path / "gpt2")
    kasa = get_kasa_model(AutoModelForCausalLM.from_pretrained(base_dir).eval(),
                          KasaConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
    kasa.save_pretrained(tmp_path / "adapter")
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    args = ["export", str(tmp_path / "adapter"), "--model", str(base_dir)]
    refused = runner.invoke(app, [*args[:2], str(users), *args[2:], "--overwrite"])
    assert refused.exit_code == 2 and "was not written by this command" in refused.output
    assert sorted(p.name for p in users.iterdir()) == ["notes.txt"]

    out = tmp_path / "lora"
    assert runner.invoke(app, [*args[:2], str(out), *args[2:]]).exit_code == 0
    again = runner.invoke(app, [*args[:2], str(out), *args[2:]])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(app, [*args[:2], str(out), *args[2:], "--overwrite"]).exit_code == 0
    assert (out / "adapter_config.json").is_file() and (out / "kasa_output.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or replaced folder left


def test_write_output_folder_failure_keeps_the_old_output(tmp_path):
    from kasa_peft.experiments.rundir import write_output_folder

    out = tmp_path / "out"
    write_output_folder(out, lambda folder: (folder / "a.txt").write_text("old"), kind="merged model")

    def failing(folder):
        (folder / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_output_folder(out, failing, kind="merged model", overwrite=True)
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ValueError, match="not written by this command"):
        write_output_folder(out, failing, kind="PEFT export", overwrite=True)  # another command's output
