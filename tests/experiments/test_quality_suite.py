"""``benchmarks/quality_suite.py --smoke``: the GPU suite's plumbing end to end on tiny models (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _paths import DATA  # noqa: E402  (tests/experiments is on sys.path under pytest)

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "quality_suite.py"


def test_every_stage_of_both_scales_is_a_valid_config():
    sys.path.insert(0, str(SUITE.parent))
    import quality_suite
    from kasa_peft.experiments.compare import comparison_configs

    for scale, stages in quality_suite.SCALES.items():
        for stage, settings in stages.items():
            configs = comparison_configs(None, list(quality_suite.METHODS), [0], Path("unused") / stage, **settings)
            assert all(c.preset in ("paper", "quick") for c in configs), (scale, stage)
    gpu = quality_suite.SCALES["gpu"]
    assert {s["task"] for s in gpu.values()} == {"cola", "sst2", "mrpc", "stsb", "rte", "qnli", "e2e", "commonsense", "instruction"}
    assert all(s["preset"] == "paper" for s in gpu.values() if s["task"] != "instruction")  # instruction has no paper preset


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")
def test_smoke_suite_runs_and_writes_the_report(tmp_path):
    subprocess.run([sys.executable, str(SUITE), "--smoke", "--data-dir", str(DATA), "--output-dir", str(tmp_path),
                    "--stages", "glue-rte,instruction"], check=True, capture_output=True, timeout=900)
    record = json.loads((tmp_path / "suite.json").read_text())
    assert list(record["stages"]) == ["glue-rte", "instruction"] and record["methods"] == ["kasa", "lora"]
    report = (tmp_path / "report" / "report.md").read_text()
    for task in ("rte", "instruction"):
        for method in ("kasa", "lora"):
            result = json.loads((tmp_path / ("glue-rte" if task == "rte" else task) / f"{method}-s0" / "result.json").read_text())
            assert result["status"] == "complete" and result["step0"] and result["budget"]["max_train_examples"] == 16
            assert f"| {task} | {method} | 1 |" in report
    assert "paper · ≤16 train · ≤8 eval" in report
