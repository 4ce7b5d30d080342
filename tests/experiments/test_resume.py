"""A run killed with SIGKILL resumes from its last complete checkpoint and ends exactly like an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ARGS = ["train", "--task", "sst2", "--demo-data", "--model", "tiny-bert", "--method", "kasa", "--train-limit", "512",
        "--eval-limit", "64", "--batch-size", "4", "--max-steps", "200", "--save-steps", "20", "--seed", "3"]


def _kasa(*args: str) -> list[str]:
    return [sys.executable, "-m", "kasa_peft.experiments.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_kasa(*ARGS, "--output-dir", str(full_dir)), env=_env(), check=True, capture_output=True, timeout=600)

    process = subprocess.Popen(_kasa(*ARGS, "--output-dir", str(killed_dir)), env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed_dir / "checkpoints" / "checkpoint-40" / "checkpoint_complete.json"
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if process.poll() is not None:
        pytest.fail("the run finished before it could be killed; raise --max-steps")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "result.json").exists(), "a killed run must not look finished"

    # Without --resume the half-done run dir is protected.
    refused = subprocess.run(_kasa(*ARGS, "--output-dir", str(killed_dir)), env=_env(), capture_output=True, text=True)
    assert refused.returncode != 0 and "--resume" in refused.stdout + refused.stderr

    subprocess.run(_kasa(*ARGS, "--output-dir", str(killed_dir), "--resume"), env=_env(), check=True,
                   capture_output=True, timeout=600)
    full = json.loads((full_dir / "result.json").read_text())
    resumed = json.loads((killed_dir / "result.json").read_text())
    assert resumed["resumed_from"] and resumed["resumed_from"].split("-")[-1].isdigit()
    assert int(resumed["resumed_from"].split("-")[-1]) >= 40
    assert resumed["global_step"] == full["global_step"] == 200
    assert resumed["final"] == pytest.approx(full["final"], rel=1e-6, abs=1e-7)
    # The metrics log has no duplicated steps after the resume.
    steps = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps))
