"""What ``--preset paper`` costs: time a few real training steps per task and extrapolate to the whole preset.

    python benchmarks/paper_preset_cost.py --data-dir ../shared/data --tasks rte,sst2,e2e,commonsense --steps 3

Per task: the preset's model-independent settings (batch size × accumulation, max_length, r, targets, loss), the
harness's model for the family (MiniLM for GLUE, SmolLM2 for the causal tasks), the ``kasa`` method, batches drawn
from the real training data. One warm-up step, then ``--steps`` timed optimiser steps (forward, backward, AdamW,
regulariser), measuring wall time and the process's CPU time. Extrapolation: optimiser steps of the full preset
(⌈train examples / (batch × accumulation)⌉ × epochs) × the median step. Evaluation and model loading are not
included. On a shared machine the wall time is inflated by other jobs; CPU time / threads is the uncontended
estimate, and both are reported. Writes ``results/paper-cost-<device>-<time>.json``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = {"glue": "minilm", "e2e": "smollm2", "commonsense": "smollm2", "instruction": "smollm2"}


def measure(task: str, data_dir: str, steps: int, device: str) -> dict:
    from transformers import set_seed

    from kasa_peft.experiments.methods import AdapterSettings, prepare_model
    from kasa_peft.experiments.models import load_model
    from kasa_peft.experiments.runconfig import build_config
    from kasa_peft.experiments.runner import _default_targets, _modules_to_save
    from kasa_peft.experiments.tasks import family_of

    family = family_of(task)
    full = build_config(task=task, preset="paper", data_dir=data_dir, model=MODELS[family.name])
    per_step = full.batch_size * full.gradient_accumulation_steps
    train_size = len(family.load_train(full))
    sampled = build_config(task=task, preset="paper", data_dir=data_dir, model=MODELS[family.name],
                           train_limit=per_step * (steps + 1))
    set_seed(0)
    loaded = load_model(sampled.model, family.kind, num_labels=family.num_labels(task))
    targets = sampled.target_modules or _default_targets(loaded.model)
    settings = AdapterSettings(r=sampled.r, lora_alpha=sampled.lora_alpha, lora_dropout=sampled.lora_dropout,
                               target_modules=targets, modules_to_save=_modules_to_save(loaded.model, family.kind),
                               beta=sampled.beta, gamma=sampled.gamma)
    model = prepare_model(loaded.model, "kasa", settings).model.to(device).train()
    features = family.encode(family.load_train(sampled), loaded.tokenizer, sampled)
    collate, loss_fn = family.collator(loaded.tokenizer), family.loss_function(sampled)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=sampled.learning_rate,
                                  weight_decay=sampled.weight_decay)
    walls, cpus = [], []
    for step in range(steps + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        for micro in range(sampled.gradient_accumulation_steps):
            start = (step * sampled.gradient_accumulation_steps + micro) * sampled.batch_size
            batch = {k: v.to(device) for k, v in collate([dict(f) for f in features[start : start + sampled.batch_size]]).items()}
            if loss_fn is not None:
                labels = batch.pop("labels")
                loss = loss_fn(model(**batch), labels)
            else:
                loss = model(**batch).loss
            (loss / sampled.gradient_accumulation_steps + model.regularization_loss()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:  # step 0 is the warm-up
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    total_steps = math.ceil(train_size / per_step) * full.epochs
    wall_step, cpu_step = statistics.median(walls), statistics.median(cpus)
    threads = torch.get_num_threads()
    return {"task": task, "model": sampled.model, "batch": f"{sampled.batch_size}×{sampled.gradient_accumulation_steps}",
            "max_length": sampled.max_length, "epochs": full.epochs, "train_examples": train_size,
            "optimizer_steps": total_steps, "wall_s_per_step": wall_step, "cpu_s_per_step": cpu_step,
            "threads": threads, "extrapolated_wall_h": total_steps * wall_step / 3600,
            "extrapolated_uncontended_h": total_steps * cpu_step / threads / 3600, "timed_steps": len(walls)}


def main() -> int:
    from common import machine_info, write_json  # benchmarks/common.py

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--tasks", default="cola,sst2,mrpc,stsb,rte,qnli,e2e,commonsense")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows, path = [], None
    for task in args.tasks.split(","):
        row = measure(task, args.data_dir, args.steps, args.device)
        rows.append(row)
        if path is not None:
            path.unlink()  # rewritten after every task, so an interrupted run keeps what it measured
        path = write_json("paper-cost", {"machine": machine_info(args.device), "rows": rows})
        print(f"{task:12s} {row['model']:8s} batch {row['batch']:6s} len≤{row['max_length']:<4d} "
              f"{row['optimizer_steps']:>7d} steps × {row['wall_s_per_step']:.2f} s wall ({row['cpu_s_per_step']:.2f} s CPU) "
              f"→ {row['extrapolated_wall_h']:.1f} h wall, {row['extrapolated_uncontended_h']:.1f} h uncontended", flush=True)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
