"""``kasa inspect`` on the tiny random Llama, its calibration-file errors, and the report's truncation plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kasa_peft.experiments.cli import app
from kasa_peft.experiments.inspect_truncation import DEFAULT_CALIBRATION_TEXT, load_calibration_texts
from kasa_peft.experiments.report import build_report
from kasa_peft.experiments.truncation_plots import plot_truncation_report, plot_truncation_report_file

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def test_inspect_tiny_llama_writes_a_json_report(tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["inspect", "--model", "tiny-llama", "--targets", "q_proj,v_proj", "--r", "2",
                                 "--per-module-loss", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "loss: original" in result.output
    data = json.loads(out.read_text())
    assert data["measured"]["data"] == "built-in English paragraph" and data["measured"]["causal_lm"]
    names = [m["name"] for m in data["modules"]]
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    assert all(isinstance(m["loss_change_alone"], float) for m in data["modules"])
    assert data["loss_change"] == pytest.approx(data["loss_truncated"] - data["loss_original"])
    assert data["tokens"] > 20


def test_inspect_reads_paragraphs_from_a_text_file(tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("First paragraph of text.\n\nSecond paragraph, a little longer than the first.\n")
    assert load_calibration_texts(data) == ["First paragraph of text.", "Second paragraph, a little longer than the first."]
    assert load_calibration_texts(None) == [DEFAULT_CALIBRATION_TEXT]
    result = runner.invoke(app, ["inspect", "--model", "tiny-llama", "--targets", "v_proj", "--r", "2", "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "1 calibration batch(es)" in result.output


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "no such file"),
        ("empty.txt", "\n\n  \n", "no text in the file"),
        ("bad.jsonl", '{"text": "ok"}\n{"sentence": "no text key"}\n', "line 2 has no string field 'text'"),
        ("broken.jsonl", "{not json\n", "line 1 is not JSON"),
    ],
)
def test_bad_calibration_file_is_one_line_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    result = runner.invoke(app, ["inspect", "--model", "tiny-llama", "--targets", "v_proj", "--data", str(path)])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def _report_dict() -> dict:
    modules = [{"name": f"model.layers.{i}.self_attn.{kind}", "shape": [8, 8], "r": 2, "truncated": True,
                "dropped_energy": 0.01 * (i + 1), "sigma_ratio": 0.2, "output_change": 0.05 * (i + 1),
                "loss_change_alone": 0.1 * i, "flagged": i > 1} for i in range(3) for kind in ("q_proj", "v_proj")]
    return {"modules": modules, "tokens": 10, "batches": 1, "loss_original": 3.0, "loss_truncated": 4.0,
            "basis": "weight", "max_output_change": 0.1, "max_loss_increase": None, "notes": []}


def test_truncation_plot_and_report_hook(tmp_path):
    path = plot_truncation_report(_report_dict(), tmp_path / "t.png")
    assert path.read_bytes().startswith(PNG)
    assert plot_truncation_report({"modules": []}, tmp_path / "none.png") is None
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert plot_truncation_report_file(tmp_path / "junk.json", tmp_path / "junk.png") is None
    assert not (tmp_path / "junk.png").exists()

    run = tmp_path / "runs" / "sst2-kasa-s0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"task": "sst2", "method": "kasa", "seed": 0, "model": "tiny"}))
    (run / "result.json").write_text(json.dumps({"status": "complete", "task": "sst2", "method": "kasa", "seed": 0,
                                                 "primary_metric": "accuracy", "final": {"accuracy": 0.5},
                                                 "best": {"accuracy": 0.5}}))
    (run / "truncation_report.json").write_text(json.dumps(_report_dict()))
    report = build_report([tmp_path / "runs"], tmp_path / "out")
    text = Path(report).read_text()
    assert "what KaSA's truncation does before training" in text and "truncation.png" in text
    assert (tmp_path / "out" / "truncation.png").read_bytes().startswith(PNG)


def test_harness_passes_guard_and_basis_through_to_kasa():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from kasa_peft.experiments.methods import AdapterSettings, prepare_model
    from kasa_peft.experiments.runconfig import RunConfig

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, max_position_embeddings=32, num_labels=2))
    batches = [{"input_ids": torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))}]
    settings = AdapterSettings(r=2, target_modules=["query", "value"], modules_to_save=["classifier"],
                               truncation_guard="off", truncation_basis="activation", calibration_batches=batches)
    prepared = prepare_model(bert, "kasa", settings)
    config = prepared.model.peft_config["default"]
    assert (config.truncation_guard, config.truncation_basis) == ("off", "activation")
    assert any("not the paper's method" in note for note in prepared.notes)
    assert RunConfig(truncation_basis="activation", truncation_guard="skip").to_dict()["truncation_basis"] == "activation"


@pytest.mark.parametrize("field, value", [("truncation_guard", "loud"), ("truncation_basis", "input")])
def test_run_config_refuses_unknown_guard_or_basis(field, value):
    from kasa_peft.experiments.runconfig import ConfigError, RunConfig

    with pytest.raises(ConfigError, match=f"{field} = '{value}': must be one of") as caught:
        RunConfig(**{field: value})
    assert caught.value.key == field


def test_budget_guard_reaches_kasa_config_from_the_flags():
    """`--truncation-guard budget --truncation-guard-loss-tolerance T` → RunConfig → AdapterSettings → KasaConfig."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kasa_peft.experiments.methods import AdapterSettings, prepare_model

    result = runner.invoke(app, ["train", "--task", "e2e", "--model", "tiny-llama", "--truncation-guard", "budget",
                                 "--truncation-guard-loss-tolerance", "0.02", "--print-config"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert (printed["truncation_guard"], printed["truncation_guard_loss_tolerance"]) == ("budget", 0.02)

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    settings = AdapterSettings(r=2, target_modules=["q_proj", "v_proj"], truncation_guard="budget",
                               truncation_guard_loss_tolerance=0.02, calibration_batches=[{"input_ids": ids, "labels": ids}])
    config = prepare_model(llama, "kasa", settings).model.peft_config["default"]
    assert (config.truncation_guard, config.truncation_guard_loss_tolerance) == ("budget", 0.02)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"truncation_guard": "budget", "truncation_guard_loss_tolerance": 0}, "greater than 0"),
        ({"truncation_guard": "budget", "truncation_guard_loss_tolerance": float("inf")}, "finite"),
        ({"truncation_guard": "skip", "truncation_guard_loss_tolerance": 0.05}, "only used with truncation_guard budget"),
        ({"truncation_guard_loss_tolerance": 0.05}, "only used with truncation_guard budget"),
    ],
)
def test_run_config_refuses_a_bad_or_unused_loss_tolerance(values, message):
    from kasa_peft.experiments.runconfig import ConfigError, RunConfig

    with pytest.raises(ConfigError, match=message) as caught:
        RunConfig(**values)
    assert caught.value.key == "truncation_guard_loss_tolerance"
    assert str(caught.value).startswith("truncation_guard_loss_tolerance = ")
