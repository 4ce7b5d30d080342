"""Step-0 records, eval on held-out files, and the loss/encoding pieces that presets switch on (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import set_seed
from typer.testing import CliRunner

from kasa_peft.experiments.cli import app
from kasa_peft.experiments.generation import causal_lm_loss, encode_sft_example
from kasa_peft.experiments.runconfig import build_config

from _paths import DATA  # noqa: E402  (tests/experiments is on sys.path under pytest)

runner = CliRunner()
TINY = ["--task", "sst2", "--demo-data", "--model", "tiny-bert", "--max-train-examples", "32", "--eval-limit", "24",
        "--batch-size", "8", "--max-length", "32", "--max-steps", "6", "--save-steps", "100"]


def _ok(result):
    assert result.exit_code == 0, result.output[-3000:]
    return result


def _train(out: Path, *extra: str) -> dict:
    _ok(runner.invoke(app, ["train", *TINY, "--output-dir", str(out), *extra]))
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def kasa_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("step0") / "kasa"
    _train(out, "--method", "kasa", "--learning-rate", "5e-2")
    return out


def _fresh_model_metrics(run: Path, method: str) -> dict:
    """What the runner's step-0 evaluation must equal: the freshly prepared model (same seeds), evaluated directly."""
    from kasa_peft.experiments.methods import AdapterSettings, prepare_model
    from kasa_peft.experiments.models import load_model
    from kasa_peft.experiments.tasks import family_of

    recorded = json.loads((run / "config.json").read_text())
    config = build_config(**{k: recorded[k] for k in ("task", "demo_data", "model", "train_limit", "eval_limit",
                                                       "batch_size", "max_length", "seed")}, method=method)
    family = family_of(config.task)
    set_seed(config.seed)
    loaded = load_model(config.model, family.kind, num_labels=family.num_labels(config.task))
    settings = AdapterSettings(r=config.r, lora_alpha=config.lora_alpha, target_modules=recorded["resolved_target_modules"],
                               modules_to_save=recorded["modules_to_save"], beta=config.beta, gamma=config.gamma)
    set_seed(config.seed)
    model = prepare_model(loaded.model, method, settings).model
    return family.evaluate(model, loaded.tokenizer, config, family.load_eval(config), run / "unused")


def test_step0_is_the_prepared_model_before_any_step(kasa_run):
    result = json.loads((kasa_run / "result.json").read_text())
    assert result["step0"] == json.loads((kasa_run / "step0" / "metrics.json").read_text())
    fresh = _fresh_model_metrics(kasa_run, "kasa")
    assert result["step0"]["loss"] == pytest.approx(fresh["loss"], rel=1e-5)
    assert result["step0"]["accuracy"] == pytest.approx(fresh["accuracy"])
    assert abs(result["final"]["loss"] - result["step0"]["loss"]) > 1e-3, "training must have moved the loss"
    assert result["global_step"] == 6 and result["budget"]["optimizer_steps"] == 6
    assert result["budget"]["max_train_examples"] == 32 and result["budget"]["preset"] == "quick"


def test_step0_evaluation_does_not_change_training(kasa_run, tmp_path):
    without = _train(tmp_path / "no-step0", "--method", "kasa", "--learning-rate", "5e-2", "--no-step0-eval")
    with_step0 = json.loads((kasa_run / "result.json").read_text())
    assert without["step0"] is None and not (tmp_path / "no-step0" / "step0").exists()
    assert without["final"] == pytest.approx(with_step0["final"], rel=1e-6, abs=1e-7)


def test_report_shows_the_step0_column(kasa_run, tmp_path):
    _ok(runner.invoke(app, ["report", str(kasa_run), "--output-dir", str(tmp_path)]))
    report = (tmp_path / "report.md").read_text()
    step0 = json.loads((kasa_run / "result.json").read_text())["step0"]["accuracy"]
    assert "step 0 (median)" in report and f"| {step0 * 100:.2f} |" in report
    assert "quick · ≤32 train · ≤24 eval" in report


def _write_sst2_tsv(path: Path, items: list[dict]) -> Path:
    path.write_text("sentence\tlabel\n" + "".join(f"{i['sentence1']}\t{i['label']}\n" for i in items))
    return path


def test_eval_file_scores_a_labelled_glue_tsv(kasa_run, tmp_path):
    from kasa_peft.experiments.tasks.common import cap_items
    from kasa_peft.experiments.tasks.glue import load_demo_sst2

    # The run's own dev subset written as a held-out file must reproduce the run's final evaluation.
    same = _write_sst2_tsv(tmp_path / "same.tsv", cap_items(load_demo_sst2("validation"), 24))
    _ok(runner.invoke(app, ["eval", str(kasa_run), "--eval-file", str(same)]))
    scored = json.loads((kasa_run / "eval_same.json").read_text())
    assert scored["accuracy"] == pytest.approx(json.loads((kasa_run / "result.json").read_text())["final"]["accuracy"])
    assert scored["eval_file"] == str(same.resolve())
    # Flipping every label turns accuracy a into 1 − a: the file's labels are the ones scored.
    flipped = _write_sst2_tsv(tmp_path / "flipped.tsv",
                              [{**i, "label": 1 - i["label"]} for i in cap_items(load_demo_sst2("validation"), 24)])
    _ok(runner.invoke(app, ["eval", str(kasa_run), "--eval-file", str(flipped)]))
    assert json.loads((kasa_run / "eval_flipped.json").read_text())["accuracy"] == pytest.approx(1 - scored["accuracy"])


def test_eval_file_with_the_wrong_layout_names_the_expected_columns(kasa_run, tmp_path):
    wrong = tmp_path / "wrong.tsv"
    wrong.write_text("text\tgold\nnice film\t1\n")
    result = runner.invoke(app, ["eval", str(kasa_run), "--eval-file", str(wrong)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "sentence" in result.output and "label" in result.output
    missing = runner.invoke(app, ["eval", str(kasa_run), "--eval-file", str(tmp_path / "nope.tsv")])
    assert missing.exit_code != 0 and "not found" in missing.output


@pytest.mark.skipif(not (DATA / "glue" / "SST-2" / "dev.tsv").is_file(), reason="../shared/data is not present")
def test_eval_reads_only_the_eval_split(tmp_path):
    run = tmp_path / "run"
    _ok(runner.invoke(app, ["train", "--task", "sst2", "--data-dir", str(DATA), "--model", "tiny-bert", "--method", "lora",
                            "--max-train-examples", "16", "--eval-limit", "16", "--max-steps", "1", "--max-length", "32",
                            "--no-step0-eval", "--output-dir", str(run)]))
    only_dev = tmp_path / "only-dev"
    (only_dev / "glue" / "SST-2").mkdir(parents=True)
    (only_dev / "glue" / "SST-2" / "dev.tsv").write_bytes((DATA / "glue" / "SST-2" / "dev.tsv").read_bytes())
    _ok(runner.invoke(app, ["eval", str(run), "--data-dir", str(only_dev)]))  # train_full.tsv is absent there
    final = json.loads((run / "result.json").read_text())["final"]["accuracy"]
    assert json.loads((run / "eval.json").read_text())["accuracy"] == pytest.approx(final)


# ----------------------------------------------------------------------------------------------- loss and encoding
def test_label_smoothed_causal_loss_against_its_definition():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 1, 6, 2], [-100, -100, 4, 0, -100]])
    eps = 0.1
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    mask = targets != -100
    nll = -logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    smooth = -logp.mean(-1)
    expected = (((1 - eps) * nll + eps * smooth) * mask).sum() / mask.sum()
    assert causal_lm_loss(eps)({"logits": logits}, labels) == pytest.approx(float(expected), rel=1e-6)
    # normalised by the accumulated token count when the Trainer passes it
    assert causal_lm_loss(eps)({"logits": logits}, labels, num_items_in_batch=10) == pytest.approx(
        float(expected * mask.sum() / 10), rel=1e-6)


def test_unsmoothed_causal_loss_equals_the_models_own_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)).eval()
    input_ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    labels = input_ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        outputs = model(input_ids=input_ids, labels=labels)
    assert float(causal_lm_loss(0.0)(outputs, labels)) == pytest.approx(float(outputs.loss), rel=1e-5)


class _CharTokenizer:
    """One id per character; BOS 1, EOS 2; no [SEP]."""

    sep_token_id = None
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [10 + ord(c) % 50 for c in text]}


def test_train_on_inputs_puts_the_prompt_into_the_labels():
    tok = _CharTokenizer()
    masked = encode_sft_example(tok, "abc", "de", max_length=16)
    assert masked["input_ids"] == [1, *tok("abc", False)["input_ids"], *tok("de", False)["input_ids"], 2]
    assert masked["labels"] == [-100] * 4 + masked["input_ids"][4:]
    full = encode_sft_example(tok, "abc", "de", max_length=16, train_on_inputs=True)
    assert full["labels"] == full["input_ids"] == masked["input_ids"]
    cut = encode_sft_example(tok, "abc", "de", max_length=5, train_on_inputs=True)
    assert cut["input_ids"] == masked["input_ids"][:5] and cut["labels"] == cut["input_ids"]


@pytest.mark.skipif(not (DATA / "e2e" / "devset.csv").is_file(), reason="../shared/data is not present")
def test_e2e_capped_conversion_is_the_same_subset_of_the_full_conversion(tmp_path, monkeypatch):
    from kasa_peft.experiments.tasks.common import cap_items
    from kasa_peft.experiments.tasks.e2e_family import _converted_csv
    from kasa_peft.experiments.tasks.e2e_lora_format import csv_to_lora_lines

    small = tmp_path / "trainset.csv"
    small.write_text("\n".join((DATA / "e2e" / "devset.csv").read_text(encoding="utf-8-sig").splitlines()[:13]) + "\n")
    monkeypatch.setenv("KASA_CACHE_DIR", str(tmp_path / "cache"))
    full = [tuple(part.strip() for part in line.split("||")) for line in csv_to_lora_lines(small)]
    assert _converted_csv(small, 5) == cap_items(full, 5)
    assert _converted_csv(small, None) == full and len(list((tmp_path / "cache").rglob("*.txt"))) == 1


def test_regularization_form_reaches_the_adapter(tmp_path):
    from kasa_peft.config import CONFIG_NAME

    out = tmp_path / "authors"
    _ok(runner.invoke(app, ["train", *TINY, "--method", "kasa", "--max-steps", "1", "--no-step0-eval",
                            "--regularization-form", "authors", "--output-dir", str(out)]))
    assert json.loads((out / "config.json").read_text())["regularization_form"] == "authors"
    assert json.loads((out / "adapter" / CONFIG_NAME).read_text())["regularization_form"] == "authors"
    assert "kasa: regularization_form='authors'" in json.loads((out / "result.json").read_text())["notes"]
