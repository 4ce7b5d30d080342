"""``kasa_peft.experiments.report`` on synthetic run directories with hand-chosen numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kasa_peft.experiments.report import (
    build_report,
    find_runs,
    markdown_table,
    plot_learning_curves,
    plot_sigma,
    plot_spectrum,
    rich_table,
    summarize,
)

PNG = b"\x89PNG\r\n\x1a\n"

# (task, method) -> per seed: best and final metrics (without the eval_ prefix).
#   sst2 best accuracy: kasa .90/.92 → 91.00 ± 1.41, lora .88/.86 → 87.00 ± 1.41   (kasa best)
#   sst2 final accuracy: kasa .89/.91 → 90.00 ± 1.41, lora .92/.90 → 91.00 ± 1.41  (lora best)
#   e2e BLEU: kasa .60/.64 → 62.00 ± 2.83, lora .66/.70 → 68.00 ± 2.83 (lora best); NIST unscaled
#   e2e NIST: kasa 8.0/8.4 → 8.20 ± 0.28, lora 8.5/8.7 → 8.60 ± 0.14
NUMBERS = {
    ("sst2", "kasa"): [({"accuracy": 0.90, "loss": 0.30, "epoch": 2.0}, {"accuracy": 0.89, "loss": 0.31}),
                       ({"accuracy": 0.92, "loss": 0.28, "epoch": 1.0}, {"accuracy": 0.91, "loss": 0.29})],
    ("sst2", "lora"): [({"accuracy": 0.88, "loss": 0.35, "epoch": 2.0}, {"accuracy": 0.92, "loss": 0.33}),
                       ({"accuracy": 0.86, "loss": 0.36, "epoch": 2.0}, {"accuracy": 0.90, "loss": 0.34})],
    ("e2e", "kasa"): [({"BLEU": 0.60, "NIST": 8.0, "epoch": 2.0}, {"BLEU": 0.60, "NIST": 8.0}),
                      ({"BLEU": 0.64, "NIST": 8.4, "epoch": 2.0}, {"BLEU": 0.64, "NIST": 8.4})],
    ("e2e", "lora"): [({"BLEU": 0.66, "NIST": 8.5, "epoch": 2.0}, {"BLEU": 0.66, "NIST": 8.5}),
                      ({"BLEU": 0.70, "NIST": 8.7, "epoch": 2.0}, {"BLEU": 0.70, "NIST": 8.7})],
}
PRIMARY = {"sst2": "accuracy", "e2e": "BLEU"}
SETTINGS = {"kasa": {"r": 8, "lora_alpha": 16, "learning_rate": 5e-4}, "lora": {"r": 16, "lora_alpha": 32, "learning_rate": 1e-4}}
PARAMS = {"kasa": 1234, "lora": 5678}
STEP0 = {"sst2": {"accuracy": 0.5}}  # every sst2 run starts at 50.00; e2e runs have no step-0 record
BUDGET = {"sst2": {"preset": "paper", "max_train_examples": 2000, "epochs": 3, "preset_epochs": 100, "max_steps": None}}


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _make_run(run_dir: Path, task: str, method: str, seed: int, best: dict | None, final: dict | None,
              status: str | None = "complete") -> Path:
    config = {"task": task, "method": method, "model": "tiny", "seed": seed, "target_modules": ["query", "value"],
              **SETTINGS.get(method, SETTINGS["lora"])}
    _write(run_dir / "config.json", config)
    lines = [{"step": step, "epoch": step / 20, "kind": "train", "loss": 1.0 / step + seed * 0.01, "learning_rate": 1e-4}
             for step in (10, 20, 30, 40)]
    if task == "sst2" and best is not None:
        lines += [{"step": 20, "epoch": 1.0, "kind": "eval", "eval_accuracy": best["accuracy"] - 0.05, "eval_loss": 0.5},
                  {"step": 40, "epoch": 2.0, "kind": "eval", "eval_accuracy": final["accuracy"], "eval_loss": 0.4}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    analysis = {"spectrum": {"module": "encoder.layer.0.attention.self.query", "r": 4,
                             "singular_values": [10.0 / (i + 1) for i in range(16)]},
                "sigma": {f"encoder.layer.{i}.attention.self.query": [0.1 * (i + 1) * (-1) ** j for j in range(4)]
                          for i in range(3)} if method == "kasa" else None}
    _write(run_dir / "analysis.json", analysis)
    if status is not None:
        _write(run_dir / "result.json", {
            "status": status, "task": task, "method": method, "model": "tiny", "seed": seed,
            "primary_metric": PRIMARY[task], "final": final or {}, "best": best or {},
            "trainable_params": PARAMS.get(method, 1), "total_params": 100000, "train_runtime_s": 1.5,
            "notes": [f"{method} note"], "step0": STEP0.get(task), "budget": BUDGET.get(task),
        })
    return run_dir


@pytest.fixture()
def runs_root(tmp_path) -> Path:
    root = tmp_path / "runs"
    for (task, method), seeds in NUMBERS.items():
        for seed, (best, final) in enumerate(seeds):
            _make_run(root / task / f"{method}-s{seed}", task, method, seed, best, final)
    # Unfinished: no result.json at all, and one whose result says it is not complete; absurd numbers in both.
    _make_run(root / "sst2" / "kasa-s2", "sst2", "kasa", 2, {"accuracy": 0.0, "epoch": 1.0}, {"accuracy": 0.0}, status=None)
    _make_run(root / "sst2" / "lora-s3", "sst2", "lora", 3, {"accuracy": 0.0, "epoch": 1.0}, {"accuracy": 0.0}, status="failed")
    return root


def test_find_runs_recurses_dedups_and_flags_unfinished(runs_root, tmp_path):
    runs = find_runs([runs_root, runs_root / "sst2" / "kasa-s0"])  # the second is already below the first
    assert len(runs) == 10
    unfinished = {run.path.name for run in runs if not run.complete}
    assert unfinished == {"kasa-s2", "lora-s3"}
    reasons = {run.path.name: run.reason for run in runs if not run.complete}
    assert reasons == {"kasa-s2": "no result.json", "lora-s3": "status: failed"}
    # a single run directory is itself accepted; deeper than max_depth is not searched
    assert [r.path.name for r in find_runs([runs_root / "e2e" / "lora-s1"])] == ["lora-s1"]
    deep = tmp_path / "a" / "b" / "c" / "d"
    _make_run(deep / "kasa-s0", "sst2", "kasa", 0, *NUMBERS[("sst2", "kasa")][0])
    assert find_runs([tmp_path / "a"]) == []
    assert len(find_runs([tmp_path / "a" / "b"])) == 1
    with pytest.raises(FileNotFoundError):
        find_runs([tmp_path / "missing"])


def test_summarize_mean_and_sample_std(runs_root):
    summary = summarize(find_runs([runs_root]))
    assert [(e["task"], e["method"]) for e in summary] == [("e2e", "kasa"), ("e2e", "lora"), ("sst2", "kasa"), ("sst2", "lora")]
    by_key = {(e["task"], e["method"]): e for e in summary}
    assert all(e["n"] == 2 and e["seeds"] == [0, 1] for e in summary), "unfinished runs must not be counted"
    expected = {  # (task, method, which, metric): (mean, sample std)
        ("sst2", "kasa", "best", "accuracy"): (0.91, 0.0141421356),
        ("sst2", "lora", "best", "accuracy"): (0.87, 0.0141421356),
        ("sst2", "kasa", "final", "accuracy"): (0.90, 0.0141421356),
        ("sst2", "lora", "final", "accuracy"): (0.91, 0.0141421356),
        ("sst2", "kasa", "best", "epoch"): (1.5, 0.7071067812),
        ("e2e", "kasa", "best", "BLEU"): (0.62, 0.0282842712),
        ("e2e", "lora", "best", "BLEU"): (0.68, 0.0282842712),
        ("e2e", "kasa", "final", "NIST"): (8.2, 0.2828427125),
        ("e2e", "lora", "final", "NIST"): (8.6, 0.1414213562),
    }
    for (task, method, which, metric), (mean, std) in expected.items():
        stat = by_key[(task, method)][which][metric]
        assert stat["mean"] == pytest.approx(mean) and stat["std"] == pytest.approx(std) and stat["n"] == 2
    assert by_key[("sst2", "lora")]["trainable_params"] == 5678
    assert by_key[("e2e", "kasa")]["primary_metric"] == "BLEU"


def test_method_order_puts_known_methods_first(tmp_path):
    for method in ("zeta", "full", "lora", "kasa", "dora", "alpha"):
        _make_run(tmp_path / method, "sst2", method, 0, {"accuracy": 0.5, "epoch": 1.0}, {"accuracy": 0.5})
    assert [e["method"] for e in summarize(find_runs([tmp_path]))] == ["kasa", "lora", "dora", "full", "alpha", "zeta"]


def _row(table: str, task: str, method: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"| {task} | {method} |"))


def test_markdown_table_scales_and_bolds_the_best(runs_root):
    summary = summarize(find_runs([runs_root]))
    best = markdown_table(summary, "best")
    assert "×100" in best and "NIST and CIDEr are unscaled" in best
    # paired Δ vs lora per seed: sst2 kasa (.90−.88, .92−.86) = (+2, +6) → +4.00 ± 2.83; e2e kasa (−6, −6)
    budget = "paper · ≤2000 train · 3/100 ep"
    assert _row(best, "sst2", "kasa") == f"| sst2 | kasa | 2 | {budget} | 50.00 | **accuracy 91.00** | 91.00 ± 1.41 | +4.00 ± 2.83 (ahead 2/2) | – | 1,234 |"
    assert _row(best, "sst2", "lora") == f"| sst2 | lora | 2 | {budget} | 50.00 | accuracy 87.00 | 87.00 ± 1.41 | ref | – | 5,678 |"
    assert _row(best, "e2e", "lora") == "| e2e | lora | 2 | – | – | **BLEU 68.00** | 68.00 ± 2.83 | ref | 8.60 ± 0.14 | 5,678 |"
    assert _row(best, "e2e", "kasa") == "| e2e | kasa | 2 | – | – | BLEU 62.00 | 62.00 ± 2.83 | -6.00 ± 0.00 (ahead 0/2) | 8.20 ± 0.28 | 1,234 |"
    header = best.splitlines()[2]
    assert header == ("| task | method | seeds | budget | step 0 (median) | primary: median | mean ± std | Δ vs lora (paired) "
                      "| NIST | trainable params |")
    final = markdown_table(summary, "final")
    assert _row(final, "sst2", "lora").startswith(f"| sst2 | lora | 2 | {budget} | 50.00 | **accuracy 91.00** | 91.00 ± 1.41 |")
    assert _row(final, "sst2", "kasa").startswith(f"| sst2 | kasa | 2 | {budget} | 50.00 | accuracy 90.00 | 90.00 ± 1.41 | -1.00 ± 2.83 (ahead 1/2) |")  # (.89−.92, .91−.90)
    with pytest.raises(ValueError):
        markdown_table(summary, "median")
    assert "No finished runs" in markdown_table([], "best")


def test_median_differs_from_mean_and_pairs_only_common_seeds(tmp_path):
    """Three kasa seeds (.80, .81, .90: median .81, mean .8367) against two lora seeds (.80, .70): pairs on seeds 0, 1."""
    for seed, value in enumerate((0.80, 0.81, 0.90)):
        _make_run(tmp_path / f"kasa-s{seed}", "sst2", "kasa", seed, {"accuracy": value, "epoch": 1.0}, {"accuracy": value})
    for seed, value in enumerate((0.80, 0.70)):
        _make_run(tmp_path / f"lora-s{seed}", "sst2", "lora", seed, {"accuracy": value, "epoch": 1.0}, {"accuracy": value})
    kasa = next(e for e in summarize(find_runs([tmp_path])) if e["method"] == "kasa")
    stat = kasa["best"]["accuracy"]
    assert stat["median"] == pytest.approx(0.81) and stat["mean"] == pytest.approx(0.8366666667)
    assert stat["std"] == pytest.approx(0.0550757055)  # sample std of (.80, .81, .90)
    paired = kasa["paired"]["best"]
    assert paired["seeds"] == [0, 1] and paired["diffs"] == pytest.approx([0.0, 0.11])
    assert paired["ahead"] == 1 and paired["level"] == 1 and paired["n"] == 2
    assert paired["mean"] == pytest.approx(0.055) and paired["median"] == pytest.approx(0.055)
    assert kasa["step0"]["accuracy"]["median"] == pytest.approx(0.5)
    row = _row(markdown_table(summarize(find_runs([tmp_path])), "best"), "sst2", "kasa")
    assert "| **accuracy 81.00** | 83.67 ± 5.51 | +5.50 ± 7.78 (ahead 1/2) |" in row


def test_rich_table_rows(runs_root):
    from rich.console import Console

    table = rich_table(summarize(find_runs([runs_root])), "best")
    assert table.row_count == 4
    console = Console(record=True, width=250)
    console.print(table)
    text = console.export_text()
    assert "accuracy 91.00" in text and "91.00 ± 1.41" in text and "BLEU 68.00" in text and "+4.00 ± 2.83" in text


def test_plots_write_pngs_and_skip_runs_without_analysis(runs_root, tmp_path):
    runs = {run.path.name + "/" + run.task: run for run in find_runs([runs_root])}
    curves = plot_learning_curves(list(runs.values()), tmp_path / "plots")
    assert sorted(p.name for p in curves) == ["curves_e2e.png", "curves_sst2.png"]
    kasa, lora = runs["kasa-s0/sst2"], runs["lora-s0/sst2"]
    written = [plot_spectrum(kasa, tmp_path / "plots" / "spectrum.png"), plot_sigma(kasa, tmp_path / "plots" / "sigma.png")]
    for path in [*curves, *written]:
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 1000
    assert plot_sigma(lora, tmp_path / "plots" / "lora_sigma.png") is None
    assert not (tmp_path / "plots" / "lora_sigma.png").exists()
    (lora.path / "analysis.json").unlink()
    assert plot_spectrum(lora, tmp_path / "plots" / "none.png") is None


def test_build_report(runs_root, tmp_path):
    out = tmp_path / "report"
    path = build_report([runs_root], out)
    assert path == out / "report.md"
    report = path.read_text()
    # runs section: counts and the unfinished list, unfinished runs out of the numbers
    assert "10 run directories: 8 finished run(s); 2 unfinished run(s) excluded" in report
    assert f"`{runs_root / 'sst2' / 'kasa-s2'}`: sst2/kasa, seed 2 (no result.json)" in report
    assert f"`{runs_root / 'sst2' / 'lora-s3'}`: sst2/lora, seed 3 (status: failed)" in report
    assert "accuracy 0.00" not in report and "| sst2 | kasa | 2 | 0; 1 |" in report
    # both tables, best and final bolding
    best_section = report.split("## Best dev epoch")[1].split("## Final evaluation")[0]
    final_section = report.split("## Final evaluation")[1].split("## Settings per method")[0]
    assert "**accuracy 91.00**" in _row(best_section, "sst2", "kasa")
    assert "**accuracy 91.00**" in _row(final_section, "sst2", "lora")
    paired = report.split("## Paired differences vs LoRA")[1].split("## Settings per method")[0]
    assert "| sst2 | kasa | accuracy | 0; 1 | +2.00, +6.00 | +4.00 | 2 / 0 / 0 |" in paired
    assert "| e2e | kasa | BLEU | 0; 1 | -6.00, -6.00 | -6.00 | 0 / 0 / 2 |" in paired
    # settings per method: the differences show
    settings = report.split("## Settings per method")[1].split("## Plots")[0]
    assert "| kasa | e2e; sst2 | tiny | 8 | 16 | 0.0005 | query,value | kasa note |" in settings
    assert "| lora | e2e; sst2 | tiny | 16 | 32 | 0.0001 | query,value | lora note |" in settings
    # plots exist, are PNGs and are linked relatively
    names = ["curves_e2e.png", "curves_sst2.png", "spectrum_e2e.png", "spectrum_sst2.png", "sigma_e2e.png", "sigma_sst2.png"]
    for name in names:
        assert (out / name).read_bytes()[:8] == PNG and (out / name).stat().st_size > 1000
        assert f"]({name})" in report
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "report.md"]), "no temp files left behind"


def test_single_task_report_uses_plain_plot_names(runs_root, tmp_path):
    path = build_report([runs_root / "sst2"], tmp_path / "r")
    report = path.read_text()
    for name in ("curves_sst2.png", "spectrum.png", "sigma.png"):
        assert (tmp_path / "r" / name).read_bytes()[:8] == PNG and f"]({name})" in report


def test_report_warns_about_mixed_settings_and_rejects_empty_dirs(runs_root, tmp_path):
    config_path = runs_root / "sst2" / "lora-s1" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "r": 4}))
    report = build_report([runs_root], tmp_path / "r").read_text()
    assert "sst2/lora: runs with different r (16; 4) are averaged together" in report
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No run directories"):
        build_report([tmp_path / "empty"], tmp_path / "r2")


def test_import_and_plotting_leave_matplotlib_global_state_alone(runs_root, tmp_path):
    code = (
        "import sys; from pathlib import Path; "
        "from kasa_peft.experiments.report import find_runs, plot_learning_curves; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported at import time'; "
        f"plot_learning_curves(find_runs([Path({str(runs_root)!r})]), Path({str(tmp_path)!r})); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported by plotting'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
