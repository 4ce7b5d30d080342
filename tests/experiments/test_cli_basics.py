"""CLI smoke tests through typer's runner: help everywhere, scoring, and one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kasa_peft.experiments.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["compare"], ["report"], ["merge"], ["demo"], ["score"], ["score", "e2e"]])
def test_help_everywhere(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_score_e2e_prints_the_five_metrics(tmp_path):
    hyps = tmp_path / "hyp.txt"
    refs = tmp_path / "refs.txt"
    hyps.write_text("the eagle is a cheap pub near the river .\nblue spice serves french food .\n")
    refs.write_text("the eagle is a cheap pub near the river .\nthe eagle is a cheap pub .\n\nblue spice serves french food .\n")
    result = runner.invoke(app, ["score", "e2e", str(hyps), str(refs)])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert set(scores) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert scores["BLEU"] == pytest.approx(1.0)


def test_score_e2e_mismatched_counts_is_one_clear_error(tmp_path):
    hyps = tmp_path / "hyp.txt"
    refs = tmp_path / "refs.txt"
    hyps.write_text("one\ntwo\nthree\n")
    refs.write_text("one\n\ntwo\n")
    result = runner.invoke(app, ["score", "e2e", str(hyps), str(refs)])
    assert result.exit_code != 0
    assert "error:" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "adalora"], "Unknown method"),
        (["--task", "mnli"], "Unknown task"),
        (["--config", "missing.yaml"], "Config file not found"),
    ],
)
def test_train_bad_input_is_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["train", "--output-dir", str(tmp_path / "run"), *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "result.json").exists()


def test_yaml_config_with_flag_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("task: sst2\nmethod: lora\nmodel: tiny-bert\ndemo_data: true\ntrain_limit: 16\neval_limit: 8\n"
                      "batch_size: 8\nmax_steps: 2\nseed: 5\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--method", "kasa", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output[-2000:]
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["method"] == "kasa" and recorded["seed"] == 5 and recorded["max_steps"] == 2


def test_unknown_config_key_is_refused(tmp_path):
    config = tmp_path / "run.json"
    config.write_text('{"task": "sst2", "learning_rat": 0.1}')
    result = runner.invoke(app, ["train", "--config", str(config), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code != 0 and "learning_rat" in result.output


def _e2e_run_outputs(folder, mrs, hypotheses):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "e2e_mrs.txt").write_text("".join(mr + "\n" for mr in mrs))
    (folder / "e2e_hypotheses.txt").write_text("".join(h + "\n" for h in hypotheses))
    return folder


def test_score_e2e_run_directory_takes_each_mrs_own_references(tmp_path):
    # The references file holds more MRs than the run (a run scored with --eval-limit) and in another order.
    run = _e2e_run_outputs(tmp_path / "run", ["name : B | food : French", "name : A | Type : pub"],
                           ["b serves french food .", "a is a pub ."])
    refs = tmp_path / "test.txt"
    refs.write_text("name : A | Type : pub||a is a pub .\nname : C||c is somewhere .\n"
                    "name : B | food : French||b serves french food .\nname : B | food : French||b has french food .\n")
    result = runner.invoke(app, ["score", "e2e", str(run), str(refs)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["BLEU"] == pytest.approx(1.0)
    # The same outputs scored in file order (what a bare hypotheses file would get) do not match: the check matters.
    csv_refs = tmp_path / "refs.csv"
    csv_refs.write_text('mr,ref\n"name[A], eatType[pub]",a is a pub .\n"name[B], food[French]",b serves french food .\n')
    hyps = tmp_path / "hyp.txt"
    hyps.write_text("b serves french food .\na is a pub .\n")
    bare = runner.invoke(app, ["score", "e2e", str(hyps), str(csv_refs)])
    assert bare.exit_code == 0, bare.output
    assert json.loads(bare.output)["BLEU"] < 0.5


def test_score_e2e_run_mr_missing_from_references_is_one_line(tmp_path):
    run = _e2e_run_outputs(tmp_path / "run", ["name : A | Type : pub", "name : D"], ["a is a pub .", "d ."])
    refs = tmp_path / "test.txt"
    refs.write_text("name : A | Type : pub||a is a pub .\nname : C||c is somewhere .\n")
    result = runner.invoke(app, ["score", "e2e", str(run), str(refs)])
    assert result.exit_code == 2
    assert "MRs do not match the run's" in result.output and "'name : D'" in result.output
    assert "Traceback" not in result.output
    hyps = tmp_path / "hyp.txt"
    hyps.write_text("a is a pub .\n")
    bare = runner.invoke(app, ["score", "e2e", str(hyps), str(refs)])
    assert bare.exit_code == 2 and "1 hypotheses" in bare.output and "2 MRs" in bare.output


def test_score_e2e_folder_without_outputs_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    refs = tmp_path / "refs.txt"
    refs.write_text("one\n")
    result = runner.invoke(app, ["score", "e2e", str(tmp_path / "run"), str(refs)])
    assert result.exit_code == 2 and "no e2e_hypotheses.txt" in result.output and "Traceback" not in result.output
