"""Presets: transcribed values against the anchors' copy of the authors' logs, precedence, errors, flags, print-config."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import typer
from typer.testing import CliRunner

from kasa_peft.experiments.cli import RUN_FLAGS, app
from kasa_peft.experiments.presets import PresetError, budget_record, budget_text, presets_for, resolve_preset
from kasa_peft.experiments.runconfig import TASK_FAMILIES, RunConfig, build_config
from kasa_peft.experiments.tasks import families

from _paths import DATA  # noqa: E402  (tests/experiments is on sys.path under pytest)

runner = CliRunner()
ANCHORS = DATA.parent / "anchors" / "README.md"


@pytest.mark.skipif(not ANCHORS.is_file(), reason="../shared/anchors/README.md is not present")
def test_glue_paper_preset_matches_the_authors_logs_as_the_anchors_record_them():
    """The anchors file lists 'CoLA 32/100/4e-4/1e-4/1e-3; ...' (bs/epochs/lr/β/γ) from the RoBERTa-base log headers."""
    text = ANCHORS.read_text()
    line = next(line for line in text.splitlines() if "RoBERTa-base settings" in line) + " " + \
        text.split("RoBERTa-base settings")[1].splitlines()[1]
    names = {"CoLA": "cola", "SST-2": "sst2", "MRPC": "mrpc", "QNLI": "qnli", "RTE": "rte", "STS-B": "stsb"}
    found = dict(re.findall(r"(CoLA|SST-2|MRPC|QNLI|RTE|STS-B) ([\d.e/-]+)", line))
    assert set(found) == set(names)
    for label, task in names.items():
        bs, epochs, lr, beta, gamma = found[label].rstrip(";.").split("/")
        preset = resolve_preset(task, "paper")
        assert (preset["batch_size"], preset["epochs"]) == (int(bs), int(epochs)), task
        assert (preset["learning_rate"], preset["beta"], preset["gamma"]) == pytest.approx(
            (float(lr), float(beta), float(gamma)), rel=1e-12), task
        # common to every log header
        assert (preset["r"], preset["lora_alpha"], preset["lora_dropout"]) == (8, 16, 0.0)
        assert (preset["max_length"], preset["warmup_ratio"], preset["weight_decay"]) == (512, 0.06, 0.0)


def test_e2e_and_commonsense_paper_presets():
    e2e = resolve_preset("e2e", "paper")
    assert {k: e2e[k] for k in ("r", "lora_alpha", "lora_dropout", "weight_decay", "label_smoothing", "learning_rate",
                                "batch_size", "epochs", "warmup_steps", "num_beams", "length_penalty",
                                "no_repeat_ngram_size", "max_new_tokens")} == {
        "r": 4, "lora_alpha": 32, "lora_dropout": 0.1, "weight_decay": 0.01, "label_smoothing": 0.1,
        "learning_rate": 2e-4, "batch_size": 8, "epochs": 5, "warmup_steps": 500, "num_beams": 10,
        "length_penalty": 0.9, "no_repeat_ngram_size": 4, "max_new_tokens": 64}
    for task in ("commonsense", "boolq", "ARC-Challenge"):
        cs = resolve_preset(task, "paper")
        assert cs["batch_size"] * cs["gradient_accumulation_steps"] == 16  # log: batch_size 16, micro_batch_size 4
        assert (cs["r"], cs["lora_alpha"], cs["lora_dropout"], cs["epochs"], cs["max_length"]) == (32, 64, 0.05, 3, 256)
        assert cs["train_on_inputs"] is True and cs["learning_rate"] == 3e-4
        assert cs["target_modules"] == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def test_every_preset_key_is_a_config_field_with_a_flag_on_train_and_compare():
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    flagged = {spec[0] for spec in RUN_FLAGS}
    command = typer.main.get_command(app)
    for name in ("train", "compare"):
        params = {p.name for p in command.commands[name].params}
        assert flagged <= params, (name, flagged - params)
    for family in families().values():
        for preset in family.PRESETS.values():
            for values in preset.values():
                assert set(values) <= fields, set(values) - fields
                assert set(values) <= flagged, f"{family.name}: preset keys without a flag: {set(values) - flagged}"


def test_every_task_has_quick_and_the_paper_preset_where_the_sources_give_one():
    for task in TASK_FAMILIES:
        expected = ["quick"] if task == "instruction" else ["paper", "quick"]
        assert presets_for(task) == expected, task


def test_precedence_defaults_preset_file_flag(tmp_path):
    assert build_config(task="rte").learning_rate == RunConfig().learning_rate  # quick = the defaults
    assert build_config(task="rte", preset="paper").learning_rate == 4e-4
    config_file = tmp_path / "run.yaml"
    config_file.write_text("task: rte\npreset: paper\nlearning_rate: 1.0e-3\nbatch_size: 8\n")
    from_file = build_config(config_file)
    assert (from_file.learning_rate, from_file.batch_size, from_file.epochs) == (1e-3, 8, 100)
    flagged = build_config(config_file, batch_size=4, epochs=2)
    assert (flagged.batch_size, flagged.epochs, flagged.preset) == (4, 2, "paper")


@pytest.mark.parametrize("task, preset, message", [
    ("rte", "papr", "Unknown preset 'papr'; valid presets: paper, quick."),
    ("instruction", "paper", "Preset 'paper' does not exist for task 'instruction'; valid presets for it: quick."),
])
def test_bad_preset_errors_name_the_valid_ones(task, preset, message):
    with pytest.raises(PresetError) as error:
        build_config(task=task, preset=preset)
    assert str(error.value) == message
    result = runner.invoke(app, ["train", "--task", task, "--preset", preset, "--print-config"])
    assert result.exit_code != 0 and message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_print_config_prints_the_resolved_config_without_loading_a_model(monkeypatch):
    import kasa_peft.experiments.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("--print-config loaded a model"))
    result = runner.invoke(app, ["train", "--task", "stsb", "--preset", "paper", "--max-train-examples", "300",
                                 "--epochs", "3", "--regularization-form", "authors", "--print-config"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["preset"] == "paper" and printed["batch_size"] == 32 and printed["learning_rate"] == 3e-4
    assert (printed["train_limit"], printed["epochs"], printed["regularization_form"]) == (300, 3, "authors")
    assert set(printed) == {f.name for f in dataclasses.fields(RunConfig)}
    compared = runner.invoke(app, ["compare", "--task", "e2e", "--preset", "paper", "--methods", "kasa,lora",
                                   "--seeds", "0,1", "--print-config"])
    assert compared.exit_code == 0, compared.output
    records = json.loads(compared.stdout)
    assert [(r["method"], r["seed"]) for r in records] == [("kasa", 0), ("kasa", 1), ("lora", 0), ("lora", 1)]
    assert all(r["length_penalty"] == 0.9 and r["r"] == 4 for r in records)


def test_bad_regularization_form_is_one_line():
    result = runner.invoke(app, ["train", "--regularization-form", "mine", "--print-config"])
    assert result.exit_code != 0 and "--regularization-form mine: must be one of paper, authors" in result.output


def test_budget_records_every_cap_against_the_preset():
    config = build_config(task="cola", preset="paper", train_limit=2000, epochs=3, max_steps=400, learning_rate=1e-3)
    budget = budget_record(config, train_examples=2000, optimizer_steps=189)
    assert budget == {"preset": "paper", "max_train_examples": 2000, "max_eval_examples": None, "max_steps": 400,
                      "epochs": 3, "preset_epochs": 100, "train_examples": 2000, "optimizer_steps": 189,
                      "changed_from_preset": ["learning_rate"]}
    assert budget_text(budget) == "paper · ≤2000 train · 3/100 ep · ≤400 steps · changed: learning_rate"
    full = budget_record(build_config(task="cola", preset="paper"), 8551, 26800)
    assert budget_text(full) == "paper" and full["changed_from_preset"] == []
