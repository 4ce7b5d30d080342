"""Run directories: nothing that is not a run is ever written into or deleted, and --overwrite keeps the old run
until the new one has finished (restored if the new one fails)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kasa_peft.experiments.cli import app
from kasa_peft.experiments.rundir import (
    RUN_MARKER,
    RunDirError,
    check_run_dir,
    is_run_dir,
    open_run_dir,
    replaced_path,
)

runner = CliRunner()
TINY_RUN = ["train", "--task", "sst2", "--demo-data", "--model", "tiny-bert", "--method", "lora", "--train-limit", "8",
            "--eval-limit", "8", "--batch-size", "4", "--max-steps", "1", "--max-length", "32"]


def _snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fake_finished_run(path) -> dict[str, bytes]:
    """A run directory as `kasa train` leaves it (marker, config, result, adapter files)."""
    (path / "adapter").mkdir(parents=True)
    (path / RUN_MARKER).write_text(json.dumps({"kind": "kasa-peft run directory", "schema": 1}))
    (path / "config.json").write_text(json.dumps({"task": "sst2", "method": "lora"}))
    (path / "result.json").write_text(json.dumps({"status": "complete", "final": {"accuracy": 0.9}}))
    (path / "adapter" / "weights.bin").write_bytes(b"old adapter")
    return _snapshot(path)


def _user_folder(path) -> dict[str, bytes]:
    (path / "notes" / "sub").mkdir(parents=True)
    (path / "notes" / "todo.txt").write_text("my notes")
    (path / "notes" / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (path / "result.json").write_text("not ours either")
    return _snapshot(path)


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--resume"]])
def test_a_folder_that_is_not_a_run_is_never_touched(tmp_path, extra):
    folder = tmp_path / "mine"
    before = _user_folder(folder)
    result = runner.invoke(app, [*TINY_RUN, "--output-dir", str(folder), *extra])
    assert result.exit_code == 2, result.output[-2000:]
    assert _snapshot(folder) == before
    (line,) = _error_lines(result)
    assert str(folder) in line and "not a kasa run directory" in line
    assert "Traceback" not in result.output


def test_overwrite_with_a_bad_new_config_keeps_the_finished_run(tmp_path):
    run_dir = tmp_path / "run"
    before = _fake_finished_run(run_dir)
    result = runner.invoke(app, [*TINY_RUN, "--output-dir", str(run_dir), "--overwrite", "--method", "kasa",
                                 "--target-modules", "nope"])
    assert result.exit_code == 2, result.output[-2000:]
    assert "nope" in _error_lines(result)[0]
    assert _snapshot(run_dir) == before
    assert not replaced_path(run_dir).exists()


def test_overwrite_with_an_invalid_value_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    before = _fake_finished_run(run_dir)
    result = runner.invoke(app, [*TINY_RUN, "--output-dir", str(run_dir), "--overwrite", "--batch-size", "0"])
    assert result.exit_code == 2
    assert _snapshot(run_dir) == before


def test_overwrite_replaces_the_old_run_once_the_new_one_has_finished(tmp_path):
    run_dir = tmp_path / "run"
    _fake_finished_run(run_dir)
    result = runner.invoke(app, [*TINY_RUN, "--output-dir", str(run_dir), "--overwrite"])
    assert result.exit_code == 0, result.output[-3000:]
    assert not (run_dir / "adapter" / "weights.bin").exists()  # nothing of the old run is mixed into the new one
    assert json.loads((run_dir / "result.json").read_text())["global_step"] == 1
    assert is_run_dir(run_dir) and (run_dir / RUN_MARKER).is_file()
    assert not replaced_path(run_dir).exists()


@pytest.mark.parametrize("failure", [RuntimeError("training diverged"), KeyboardInterrupt()])
def test_a_failing_new_run_restores_the_old_one(tmp_path, failure):
    run_dir = tmp_path / "run"
    before = _fake_finished_run(run_dir)
    with pytest.raises(type(failure)):
        with open_run_dir(run_dir, overwrite=True) as checkpoint:
            assert checkpoint is None
            assert not (run_dir / "result.json").exists() and (run_dir / RUN_MARKER).is_file()
            assert replaced_path(run_dir).is_dir()  # the old run waits beside the new one
            (run_dir / "half-written.txt").write_text("partial")
            raise failure
    assert _snapshot(run_dir) == before
    assert not replaced_path(run_dir).exists()


def test_an_interrupted_overwrite_is_reported_not_resumed_over(tmp_path):
    run_dir = tmp_path / "run"
    _fake_finished_run(replaced_path(run_dir))  # what SIGKILL during an --overwrite leaves beside the new run
    run_dir.mkdir()
    with pytest.raises(RunDirError, match="interrupted --overwrite"):
        check_run_dir(run_dir, overwrite=True)


def test_finished_and_unfinished_runs_need_resume_or_overwrite(tmp_path):
    run_dir = tmp_path / "run"
    _fake_finished_run(run_dir)
    with pytest.raises(RunDirError, match="finished run"):
        check_run_dir(run_dir)
    check_run_dir(run_dir, overwrite=True)
    check_run_dir(run_dir, resume=True)
    with pytest.raises(RunDirError, match="exclude each other"):
        check_run_dir(run_dir, resume=True, overwrite=True)


def test_run_recognition(tmp_path):
    assert not is_run_dir(tmp_path)
    legacy = tmp_path / "legacy"  # written before the marker existed
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"task": "sst2", "method": "kasa", "kasa_peft_version": "0.1.0"}))
    assert is_run_dir(legacy)
    other = tmp_path / "other"  # some other tool's config.json
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert not is_run_dir(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_run_dir(empty)  # an empty folder may become a run
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        check_run_dir(file)


def test_other_ranks_neither_check_nor_move(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    before = _fake_finished_run(run_dir)
    monkeypatch.setenv("RANK", "1")
    with open_run_dir(run_dir, overwrite=True) as checkpoint:
        assert checkpoint is None
    assert _snapshot(run_dir) == before and not replaced_path(run_dir).exists()
