"""Every user mistake ends in one line ``error: ...`` naming the flag, key or file, exit code 2, no traceback;
``kasa --debug`` shows the traceback. Run configs record absolute paths, so ``kasa eval RUN`` works from anywhere."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kasa_peft.experiments.cli import app
from kasa_peft.experiments.runconfig import ConfigError, build_config
from kasa_peft.experiments.tasks import glue

runner = CliRunner()
DEMO = Path(glue.__file__).resolve().parent.parent / "demo_data"
TINY = ["--task", "sst2", "--model", "tiny-bert", "--method", "kasa", "--train-limit", "8", "--eval-limit", "8",
        "--batch-size", "4", "--max-steps", "1", "--max-length", "32"]


def _one_error_line(result) -> str:
    """The single ``error:`` line of a failed invocation (asserts there is exactly one and no traceback)."""
    assert result.exit_code == 2, result.output[-3000:]
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("--batch-size", "0", "greater than or equal to 1"),
        ("--epochs", "-1", "greater than 0"),
        ("--r", "0", "greater than or equal to 1"),
        ("--learning-rate", "0", "greater than 0"),
        ("--learning-rate", "nan", "finite"),
        ("--train-limit", "0", "greater than or equal to 1"),
        ("--seed", "-3", "greater than or equal to 0"),
        ("--truncation-guard-loss-tolerance", "0", "greater than 0"),
        ("--truncation-guard-loss-tolerance", "0.05", "only used with truncation_guard budget"),
    ],
)
def test_out_of_range_flags_name_the_flag_and_the_range(tmp_path, flag, value, allowed):
    out = tmp_path / "run"
    line = _one_error_line(runner.invoke(app, ["train", *TINY, "--demo-data", "--output-dir", str(out), flag, value]))
    assert line.startswith(f"error: {flag} ") and allowed in line
    assert not out.exists()  # refused before anything was written


def test_flag_syntax_errors_are_one_line_too():
    line = _one_error_line(runner.invoke(app, ["train", "--batch-size", "many"]))
    assert "--batch-size" in line


def test_debug_shows_the_exception_instead(tmp_path):
    result = runner.invoke(app, ["--debug", "train", *TINY, "--demo-data", "--batch-size", "0"])
    assert result.exit_code != 0 and isinstance(result.exception, ConfigError)
    assert result.exception.key == "batch_size"


def test_yaml_values_are_coerced_by_field_type(tmp_path):
    config = tmp_path / "run.yaml"
    # PyYAML reads 1e-3 (no dot) as the string '1e-3'; '8' quoted is a string too.
    config.write_text("learning_rate: 1e-3\nbeta: 1e-4\nbatch_size: '8'\nlora_dropout: 0.1\ndemo_data: yes\n")
    cfg = build_config(config)
    assert cfg.learning_rate == 1e-3 and isinstance(cfg.learning_rate, float)
    assert cfg.beta == 1e-4 and cfg.batch_size == 8 and cfg.demo_data is True


@pytest.mark.parametrize(
    "text, expected",
    [
        ("batch_size: many\n", ["run.yaml: batch_size = 'many'", "valid integer"]),
        ("epochs: -1\n", ["run.yaml: epochs = -1", "greater than 0"]),
        ("lora_dropout: 1.0\n", ["run.yaml: lora_dropout = 1.0", "less than 1"]),
        ("learning_rat: 0.1\n", ["run.yaml: learning_rat", "did you mean 'learning_rate'"]),
        ("task: sst2\n  method: [lora\n", ["run.yaml:", "invalid YAML"]),
        ("- task\n- sst2\n", ["run.yaml must hold a mapping"]),
        ("task: sst2\ntruncation_guard: loud\n", ["run.yaml: truncation_guard = 'loud'", "must be one of off, warn, skip"]),
        ("task: sst2\ntruncation_basis: grams\n", ["run.yaml: truncation_basis = 'grams'", "must be one of weight"]),
        ("task: sst2\ntruncation_guard: budget\ntruncation_guard_loss_tolerance: -1\n",
         ["run.yaml: truncation_guard_loss_tolerance = -1", "greater than 0"]),
        ("task: sst2\nregularization_form: mine\n", ["run.yaml: regularization_form = 'mine'", "must be one of paper"]),
    ],
)
def test_config_file_mistakes_name_the_file_and_key(tmp_path, text, expected):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    line = _one_error_line(runner.invoke(app, ["train", "--config", str(config), "--output-dir", str(tmp_path / "run")]))
    for part in expected:
        assert part in line


def test_malformed_json_names_the_file_and_line(tmp_path):
    config = tmp_path / "run.json"
    config.write_text('{"task": "sst2",\n "epochs": }')
    line = _one_error_line(runner.invoke(app, ["train", "--config", str(config)]))
    assert f"{config}:2: invalid JSON" in line


def test_a_flag_wins_over_the_file_and_is_named_as_the_flag(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("batch_size: 8\n")
    line = _one_error_line(runner.invoke(app, ["train", "--config", str(config), "--batch-size", "0"]))
    assert line.startswith("error: --batch-size 0:")


def test_unknown_model_lists_the_packaged_models(tmp_path):
    line = _one_error_line(runner.invoke(app, ["train", *TINY, "--demo-data", "--model", "minilmm",
                                               "--output-dir", str(tmp_path / "run")]))
    assert "--model minilmm" in line and "minilm, smollm2" in line and "tiny-bert" in line
    assert not (tmp_path / "run").exists()


def test_a_local_folder_that_is_not_a_model_is_named(tmp_path):
    line = _one_error_line(runner.invoke(app, ["train", *TINY, "--demo-data", "--model", str(tmp_path)]))
    assert str(tmp_path) in line and "config.json" in line


def _sst2_data_dir(root: Path, train_lines: int = 40) -> Path:
    """A data root laid out like shared/data, holding a slice of the shipped SST-2 subset."""
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True)
    rows = (DEMO / "sst2_train.tsv").read_text().splitlines(keepends=True)
    (folder / "train_full.tsv").write_text("".join(rows[:train_lines]))
    (folder / "dev.tsv").write_text("".join((DEMO / "sst2_dev.tsv").read_text().splitlines(keepends=True)[:20]))
    return root


def test_binary_garbage_in_a_tsv_names_the_file(tmp_path):
    data = _sst2_data_dir(tmp_path / "data")
    train_file = data / "glue" / "SST-2" / "train_full.tsv"
    train_file.write_bytes(b"sentence\tlabel\nfine\t1\n" + bytes(range(128, 256)) * 4)
    line = _one_error_line(runner.invoke(app, ["train", *TINY, "--data-dir", str(data),
                                               "--output-dir", str(tmp_path / "run")]))
    assert f"{train_file}:3" in line and "UTF-8" in line


def test_nul_bytes_in_a_tsv_name_the_file(tmp_path):
    data = _sst2_data_dir(tmp_path / "data")
    dev_file = data / "glue" / "SST-2" / "dev.tsv"
    dev_file.write_bytes(b"sentence\tlabel\nab\x00\x00cd\t1\n")
    with pytest.raises(glue.DataError, match=f"{dev_file}:2: contains NUL bytes"):
        glue.load_glue("sst2", "validation", data_dir=data)


def test_hub_glue_without_datasets_says_what_to_install(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real_find_spec(name, *a))
    monkeypatch.delenv("KASA_DATA_DIR", raising=False)
    with pytest.raises(glue.DataError, match=r"pip install 'kasa-peft\[hub\]'.*--data-dir"):
        glue.load_glue("rte", "validation")


# ------------------------------------------------------------------ a finished run, trained with relative paths
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished tiny run, trained with a *relative* --data-dir and --output-dir from its own working directory."""
    workdir = tmp_path_factory.mktemp("work")
    _sst2_data_dir(workdir / "data")
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        result = runner.invoke(app, ["train", *TINY, "--data-dir", "data", "--output-dir", "runs/tiny"])
    finally:
        os.chdir(previous)
    assert result.exit_code == 0, result.output[-3000:]
    return workdir / "runs" / "tiny"


def test_run_config_records_absolute_paths(trained_run):
    recorded = json.loads((trained_run / "config.json").read_text())
    assert recorded["output_dir"] == str(trained_run.resolve())
    assert recorded["data_dir"] == str((trained_run.parent.parent / "data").resolve())


def test_eval_works_from_another_working_directory(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the relative data dir of the training run does not exist here
    result = runner.invoke(app, ["eval", str(trained_run)])
    assert result.exit_code == 0, result.output[-3000:]
    assert "accuracy" in json.loads((trained_run / "eval.json").read_text())


def _with_truncated_adapter(trained_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    weights = copy / "adapter" / "kasa_adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return copy, weights


@pytest.mark.parametrize("command", ["eval", "merge"])
def test_truncated_adapter_is_one_line(trained_run, tmp_path, command):
    copy, _ = _with_truncated_adapter(trained_run, tmp_path)
    args = ["eval", str(copy)] if command == "eval" else ["merge", str(copy / "adapter"), str(tmp_path / "merged")]
    _one_error_line(runner.invoke(app, args))
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("command", ["eval", "merge"])
def test_truncated_adapter_error_names_the_file(trained_run, tmp_path, command):
    copy, weights = _with_truncated_adapter(trained_run, tmp_path)
    args = ["eval", str(copy)] if command == "eval" else ["merge", str(copy / "adapter"), str(tmp_path / "merged")]
    assert str(weights) in _one_error_line(runner.invoke(app, args))


def test_an_unexpected_error_is_one_line_with_exit_code_1_and_the_debug_hint(monkeypatch):
    from kasa_peft.experiments import runconfig

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(runconfig, "build_config", broken)
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "RuntimeError: something inside broke second line" in line and "--debug" in line
    debug = runner.invoke(app, ["--debug", "train"])
    assert isinstance(debug.exception, RuntimeError)


def test_values_are_validated_on_assignment_too(tmp_path):
    from kasa_peft.experiments.runconfig import RunConfig

    config = RunConfig(task="sst2", model="tiny-bert", output_dir="rel/run", target_modules="query,value")
    assert Path(config.output_dir).is_absolute() and config.target_modules == ["query", "value"]
    with pytest.raises(ConfigError, match="eval_limit = 0: must be greater than or equal to 1"):
        config.eval_limit = 0  # `kasa eval --eval-limit 0` used to mean "everything"
    config.data_dir = "some/where"
    assert config.data_dir == str(Path("some/where").resolve())


def test_invalid_adapter_json_under_eval_names_the_file(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    config_file = copy / "adapter" / "kasa_config.json"
    config_file.write_text('{"r": 8,')
    assert str(config_file) in _one_error_line(runner.invoke(app, ["eval", str(copy)]))
