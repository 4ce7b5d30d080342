"""End-to-end through the CLI on tiny random models: train → eval → report → merge, for every method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kasa_peft.experiments.cli import app
from kasa_peft.experiments.methods import METHODS

runner = CliRunner()
from _paths import DATA  # noqa: E402  (tests/experiments is on sys.path under pytest)
TINY = ["--train-limit", "32", "--eval-limit", "16", "--batch-size", "8", "--max-length", "32"]


def _ok(result):
    assert result.exit_code == 0, result.output[-3000:]
    return result


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    _ok(runner.invoke(app, ["compare", "--task", "sst2", "--demo-data", "--model", "tiny-bert", "--methods", ",".join(METHODS),
                            "--seeds", "0", "--epochs", "2", "--output-dir", str(out), *TINY]))
    return out


def test_compare_runs_every_method_and_writes_the_run_files(compare_dir):
    for method in METHODS:
        run = compare_dir / f"{method}-s0"
        for name in ("config.json", "metrics.jsonl", "result.json", "analysis.json"):
            assert (run / name).is_file(), (method, name)
        result = json.loads((run / "result.json").read_text())
        assert result["status"] == "complete" and "accuracy" in result["final"] and "accuracy" in result["best"]
        evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
        assert len(evals) == 2, "GLUE is evaluated every epoch"
    table = (compare_dir / "compare.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS)


def test_report_and_plots(compare_dir, tmp_path):
    _ok(runner.invoke(app, ["report", str(compare_dir), "--output-dir", str(tmp_path)]))
    report = (tmp_path / "report.md").read_text()
    for png in ("curves_sst2.png", "spectrum.png", "sigma.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    assert "Settings per method" in report and "full fine-tuning" in report


@pytest.mark.parametrize("method", ["kasa", "lora"])
def test_eval_reproduces_the_training_evaluation(compare_dir, method):
    run = compare_dir / f"{method}-s0"
    _ok(runner.invoke(app, ["eval", str(run)]))
    evaluated = json.loads((run / "eval.json").read_text())
    final = json.loads((run / "result.json").read_text())["final"]
    assert evaluated["accuracy"] == pytest.approx(final["accuracy"])


def test_merge_writes_a_plain_model(compare_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    _ok(runner.invoke(app, ["merge", str(compare_dir / "kasa-s0" / "adapter"), str(tmp_path / "merged")]))
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
    assert not any("kasa" in name for name, _ in merged.named_parameters())
    assert torch.isfinite(next(merged.parameters())).all()


def test_unfinished_run_is_excluded_from_the_report(compare_dir, tmp_path):
    broken = compare_dir / "zz-unfinished"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"method": "kasa", "task": "sst2"}))
    try:
        _ok(runner.invoke(app, ["report", str(compare_dir), "--output-dir", str(tmp_path)]))
        assert "1 unfinished run(s) excluded" in (tmp_path / "report.md").read_text()
    finally:
        (broken / "config.json").unlink()
        broken.rmdir()


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")
@pytest.mark.parametrize("task", ["e2e", "boolq", "instruction"])
def test_generation_tasks_train_and_score(tmp_path, task):
    out = tmp_path / task
    _ok(runner.invoke(app, ["train", "--task", task, "--model", "tiny-llama", "--method", "kasa", "--data-dir", str(DATA),
                            "--max-steps", "2", "--max-new-tokens", "4", "--output-dir", str(out), *TINY[:2], "--eval-limit", "3"]))
    result = json.loads((out / "result.json").read_text())
    expected = {"e2e": "BLEU", "boolq": "boolq_accuracy", "instruction": "mt_bench_turns_answered"}[task]
    assert expected in result["final"] and expected in result["step0"], "step 0 is evaluated like the end"
    if task == "instruction":
        (answers,) = (out / "model_answer").glob("*.jsonl")
        records = [json.loads(line) for line in answers.read_text().splitlines()]
        assert len(records) == 3 and all(len(r["choices"][0]["turns"]) == 2 for r in records), "both MT-Bench turns"
        assert result["final"]["mt_bench_turns_answered"] == 6 and "mt_bench_score" not in result["final"]
        assert not any("MT-Bench" in key or "mt_bench" in key for key in result["final"] if "overlap" in key)
    if task == "e2e":
        from kasa_peft.experiments.tasks.common import cap_items
        from kasa_peft.experiments.tasks.e2e_lora_format import group_by_mr, read_lora_format

        assert len((out / "step0" / "e2e_hypotheses.txt").read_text().splitlines()) == 3
        # The run's own 3 dev MRs as a LoRA-format references file reproduce its final scores.
        groups = cap_items(group_by_mr(read_lora_format(DATA / "e2e" / "lora_format" / "valid.txt")), 3)
        refs = tmp_path / "refs.txt"
        refs.write_text("".join(f"{mr}||{ref} \n" for mr, group in groups for ref in group))
        _ok(runner.invoke(app, ["eval", str(out), "--eval-file", str(refs)]))
        scored = json.loads((out / "eval_refs.json").read_text())
        assert scored["BLEU"] == pytest.approx(result["final"]["BLEU"])
        assert (out / "eval_refs" / "e2e_hypotheses.txt").read_text() == (out / "e2e_hypotheses.txt").read_text()


def test_model_that_does_not_fit_the_task(tmp_path):
    result = runner.invoke(app, ["train", "--task", "sst2", "--demo-data", "--model", "tiny-llama", "--output-dir", str(tmp_path / "x")])
    assert result.exit_code != 0 and "does not fit" in result.output
    assert not (tmp_path / "x" / "result.json").exists()


def test_packaged_minilm_trains_on_the_demo_data(tmp_path):
    """The demo's real path (packaged MiniLM + shipped SST-2 subset), cut to two steps."""
    out = tmp_path / "minilm"
    _ok(runner.invoke(app, ["train", "--task", "sst2", "--demo-data", "--model", "minilm", "--method", "kasa",
                            "--max-steps", "2", "--train-limit", "16", "--eval-limit", "16", "--batch-size", "8",
                            "--max-length", "32", "--output-dir", str(out)]))
    result = json.loads((out / "result.json").read_text())
    assert result["model"] == "minilm" and 0.0 <= result["final"]["accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["resolved_target_modules"] == ["query", "value"] and config["modules_to_save"] == ["classifier"]
