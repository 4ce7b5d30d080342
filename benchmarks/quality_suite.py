"""The quality suite: every family at its ``paper`` preset, cut to a stated reduced scale, six methods, one report.

    python benchmarks/quality_suite.py --data-dir ../shared/data --output-dir runs/quality        # one GPU, ≤ 25 min target
    python benchmarks/quality_suite.py --data-dir ../shared/data --output-dir runs/smoke --smoke  # tiny models, CPU, minutes

Stages (``SCALES``; each is one ``kasa compare`` with ``--preset paper`` and the caps listed, so every run's
``result.json`` records its budget and every report table shows it):

- GLUE ×6 (CoLA, SST-2, MRPC, STS-B, RTE, QNLI dev-split) with MiniLM: ≤ 2,000 training sentences, 3 epochs of the
  preset's 10–100, full dev sets (QNLI: its 20 % dev split).
- E2E with SmolLM2-135M: ≤ 2,000 training pairs, 1 of 5 epochs, the first 50 dev MRs by the seeded subset, decoding as
  the preset says (beam 10, length penalty 0.9, no-repeat 4-grams, 64 new tokens).
- Commonsense with SmolLM2: ≤ 2,000 training items of the offline mix, 1 of 3 epochs, 50 test items per task × 8.
- Instruction with SmolLM2: ≤ 1,000 Alpaca items, 1 epoch, 20 MT-Bench questions × 2 turns, ≤ 256 new tokens
  (answers written in FastChat's layout; no judge unless ``--judge-model``). No "paper" preset exists for it: quick.

Methods: kasa, peft-kasa, lora, pissa, milora, dora; seed 0 (``--seeds`` for more). The 25-minute figure is the
design target for one H100/H200-class GPU; it has not been measured (no GPU was available when this was written).
``suite.json`` records the wall time of every stage, so the first GPU run measures it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ("kasa", "peft-kasa", "lora", "pissa", "milora", "dora")

#: scale → stage → (task, model, preset, caps and settings passed to `kasa compare`)
SCALES: dict[str, dict[str, dict]] = {
    "gpu": {
        **{f"glue-{task}": {"task": task, "model": "minilm", "preset": "paper", "train_limit": 2000, "epochs": 3}
           for task in ("cola", "sst2", "mrpc", "stsb", "rte", "qnli")},
        "e2e": {"task": "e2e", "model": "smollm2", "preset": "paper", "train_limit": 2000, "epochs": 1, "eval_limit": 50},
        "commonsense": {"task": "commonsense", "model": "smollm2", "preset": "paper", "train_limit": 2000, "epochs": 1,
                        "eval_limit": 50},
        "instruction": {"task": "instruction", "model": "smollm2", "preset": "quick", "train_limit": 1000, "epochs": 1,
                        "eval_limit": 20, "max_new_tokens": 256, "max_length": 512},
    },
    # CPU-sized check that the whole suite runs end to end (random tiny models: the numbers mean nothing).
    "smoke": {
        "glue-rte": {"task": "rte", "model": "tiny-bert", "preset": "paper", "train_limit": 16, "eval_limit": 8,
                     "max_steps": 2, "max_length": 32, "batch_size": 8},
        "e2e": {"task": "e2e", "model": "tiny-llama", "preset": "paper", "train_limit": 16, "eval_limit": 2,
                "max_steps": 2, "max_length": 48, "max_new_tokens": 4, "num_beams": 2, "warmup_steps": 1},
        "commonsense": {"task": "boolq", "model": "tiny-llama", "preset": "paper", "train_limit": 16, "eval_limit": 2,
                        "max_steps": 2, "max_length": 64, "max_new_tokens": 4, "num_beams": 1, "warmup_steps": 1,
                        "r": 8, "lora_alpha": 16},  # the preset's r 32 exceeds the tiny model's 32-wide layers
        "instruction": {"task": "instruction", "model": "tiny-llama", "preset": "quick", "train_limit": 16,
                        "eval_limit": 2, "max_steps": 2, "max_length": 64, "max_new_tokens": 4},
    },
}
SMOKE_METHODS = ("kasa", "lora")


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def run_suite(data_dir: str, output_dir: Path, scale: str, methods: list[str], seeds: list[int],
              stages: list[str] | None = None, judge_model: str | None = None,
              model_dirs: dict[str, str] | None = None) -> dict:
    """Run the chosen stages (all by default) into ``output_dir/<stage>``; write the report and ``suite.json``.

    ``model_dirs`` maps the short names ``minilm``/``smollm2`` to staged model directories (``stage_models.py``).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from common import machine_info  # benchmarks/common.py

    from kasa_peft.checkpoint import atomic_write_text
    from kasa_peft.experiments.compare import comparison_configs, run_comparison
    from kasa_peft.experiments.report import build_report

    plan = {stage: {**settings, "model": (model_dirs or {}).get(settings["model"], settings["model"])}
            for stage, settings in SCALES[scale].items()}
    chosen = stages or list(plan)
    unknown = [s for s in chosen if s not in plan]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; the {scale!r} scale has {', '.join(plan)}")
    for stage in chosen:  # every config validated before anything trains
        comparison_configs(None, methods, seeds, output_dir / stage, data_dir=data_dir, **plan[stage])
    record = {"scale": scale, "methods": methods, "seeds": seeds, "device": _device(),
              "machine": machine_info("cuda" if _device() != "cpu" else "cpu"), "stages": {}}
    started = time.perf_counter()
    for stage in chosen:
        settings = {**plan[stage], **({"judge_model": judge_model} if judge_model and plan[stage]["task"] == "instruction" else {})}
        stage_start = time.perf_counter()
        run_comparison(None, methods, seeds, output_dir / stage, resume=True, data_dir=data_dir, **settings)
        record["stages"][stage] = {"settings": settings, "wall_s": time.perf_counter() - stage_start}
        print(f"[quality suite] {stage}: {record['stages'][stage]['wall_s']:.1f} s", flush=True)
    record["total_wall_s"] = time.perf_counter() - started
    report = build_report([output_dir / stage for stage in chosen], output_dir / "report")
    record["report"] = str(report)
    atomic_write_text(output_dir / "suite.json", json.dumps(record, indent=2, default=str))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("KASA_DATA_DIR"), help="shared/data layout (required)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/quality"))
    parser.add_argument("--smoke", action="store_true", help="tiny random models at a CPU scale (checks the plumbing)")
    parser.add_argument("--methods", default=None, help=f"comma-separated (default {','.join(METHODS)}; smoke: kasa,lora)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--stages", default=None, help="comma-separated subset of the scale's stages")
    parser.add_argument("--judge-model", default=None, help="local judge model for the instruction stage")
    parser.add_argument("--minilm", default=None, help="staged MiniLM directory (benchmarks/stage_models.py)")
    parser.add_argument("--smollm2", default=None, help="staged SmolLM2 directory (benchmarks/stage_models.py)")
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("--data-dir (or KASA_DATA_DIR) is required")
    methods = args.methods.split(",") if args.methods else list(SMOKE_METHODS if args.smoke else METHODS)
    record = run_suite(args.data_dir, args.output_dir, "smoke" if args.smoke else "gpu", methods,
                       [int(s) for s in args.seeds.split(",")], args.stages.split(",") if args.stages else None,
                       args.judge_model, {k: v for k, v in (("minilm", args.minilm), ("smollm2", args.smollm2)) if v})
    print(f"[quality suite] total {record['total_wall_s']:.1f} s on {record['device']}; report: {record['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
