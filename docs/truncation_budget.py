"""The budget-guard figures of docs/truncation.md: SmolLM2 (r=8, v_proj), ``truncation_guard="budget"`` at a
5 % tolerance on the built-in paragraph, with its loss figures, calibration passes and creation time (as a ratio to
creating the same adapter with the guard off, measured in this run).

Run (1 thread; needs the packaged SmolLM2, see the README):

    OMP_NUM_THREADS=1 python docs/truncation_budget.py --curves --heldout ../shared/data/instruction/alpaca/alpaca_5000.json

``--curves`` adds L(k), the loss with the first k modules kept whole, for every k along two harm orders (output
change, which the guard uses, and the per-module loss alone, which costs one pass per module), and the k each
tolerance would give. ``--heldout`` evaluates the choice on 32 Alpaca answers the guard never saw (the first 32
outputs longer than 300 characters on one line), and fits the budget on those answers to evaluate it on the
paragraph. Prints JSON.
"""

import argparse
import json
import time
import warnings

import torch

from kasa_peft import KasaConfig, get_kasa_model
from kasa_peft.experiments.inspect_truncation import DEFAULT_CALIBRATION_TEXT, calibration_batches
from kasa_peft.experiments.models import load_model
from kasa_peft.truncation_budget import bisect_kept_count, choose_modules_to_keep, harm_order, loss_target
from kasa_peft.truncation_report import adapter_minor_components, measure_truncation, truncated_loss

TOLERANCE = 0.05
TARGETS = ["v_proj"]

parser = argparse.ArgumentParser()
parser.add_argument("--curves", action="store_true")
parser.add_argument("--heldout", default=None, help="alpaca_5000.json")
args = parser.parse_args()
torch.set_num_threads(1)

loaded = load_model("smollm2", "causal", num_labels=0)
batches = calibration_batches(loaded.tokenizer, [DEFAULT_CALIBRATION_TEXT], causal=True)
tokens = int(batches[0]["attention_mask"].sum())
calls = {"n": 0}
loaded.model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))


def create(guard: str, with_batches: bool):
    """A fresh adapter on the loaded base; (model, seconds, forward calls of the base model during creation)."""
    calls["n"] = 0
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_kasa_model(loaded.model, KasaConfig(r=8, target_modules=TARGETS, truncation_guard=guard,
                                                        truncation_guard_loss_tolerance=TOLERANCE),
                               calibration_batches=batches if with_batches else None)
    return model, time.perf_counter() - start, calls["n"]


results = {"tokens": tokens, "tolerance": TOLERANCE, "targets": TARGETS, "threads": torch.get_num_threads()}
# Creation time: guard off (the paper: no calibration pass), warn (the default: 2 passes) and budget, alternated
# twice in one run.
timings = {"off": [], "warn": [], "budget": []}
for _ in range(2):
    for guard in timings:
        model, seconds, forward_calls = create(guard, with_batches=guard != "off")
        timings[guard].append(seconds)
        if guard == "budget":
            kept = model.peft_config["default"].truncation_skipped_modules or []
            budget_loss = model.truncation_report(batches).loss_truncated  # a fresh model computes the truncated one
            results["budget"] = {"kept_whole": kept, "kept": len(kept), "of": len(list(model.kasa_layers())),
                                 "forward_passes_at_creation": forward_calls, "loss_of_created_model": budget_loss}
        loaded.model = model.unload()
results["seconds"] = {guard: [round(t, 2) for t in ts] for guard, ts in timings.items()}
results["creation_time_ratio"] = {f"{guard} / off": round(min(timings[guard]) / min(timings["off"]), 2)
                                  for guard in ("warn", "budget")}
results["creation_time_ratio"]["budget / warn"] = round(min(timings["budget"]) / min(timings["warn"]), 2)

# The same decision, through the guard's own function, for its search record.
model, _, _ = create("off", with_batches=False)
layers, minors = adapter_minor_components(model)
report = measure_truncation(model, layers, minors, batches, per_module_loss=args.curves)
decision = choose_modules_to_keep(model, layers, minors, batches, report, TOLERANCE)
assert sorted(decision.kept_whole) == results["budget"]["kept_whole"], "the guard and the direct call disagree"
results["decision"] = {
    "loss_original": decision.loss_original, "loss_all_truncated": decision.loss_all_truncated,
    "loss_budget": decision.loss_chosen, "target": decision.search.target, "kept": len(decision.kept_whole),
    "forward_passes": decision.forward_passes, "bisection_losses": dict(sorted(decision.search.losses.items())),
    "kept_in_harm_order": decision.kept_whole,
    "output_change": {m.name: round(m.output_change, 4) for m in report.modules},
}

if args.curves:
    alone = {m.name: m.loss_change_alone for m in report.modules}
    orders = {"output change": harm_order(report),
              "loss alone": sorted(alone, key=lambda name: (-alone[name], name))}
    curves = {}
    for label, order in orders.items():
        curve = []
        for k in range(len(order) + 1):
            kept = set(order[:k])
            curve.append(truncated_loss(model, layers, {n: m for n, m in minors.items() if n not in kept}, batches))
        by_tolerance = {}
        for tolerance in (0.01, 0.02, 0.05, 0.1):
            target = loss_target(decision.loss_original, tolerance)
            first = next(k for k, loss in enumerate(curve) if loss <= target)
            bisected = bisect_kept_count(len(order), curve.__getitem__, target, curve[0], decision.loss_original).kept
            by_tolerance[str(tolerance)] = {"fewest (linear scan)": first, "bisection": bisected}
        curves[label] = {"order": order, "loss_by_kept": [round(x, 4) for x in curve], "kept_for_tolerance": by_tolerance}
    results["curves"] = curves

if args.heldout:
    records = json.load(open(args.heldout, encoding="utf-8"))
    texts = [r["output"] for r in records if len(r["output"]) > 300 and "\n" not in r["output"]][:32]
    heldout = calibration_batches(loaded.tokenizer, texts, causal=True)
    skip_kept = {m.name for m in report.modules if m.output_change > 0.1}
    losses = {"tokens": int(sum(int(b["attention_mask"].sum()) for b in heldout)),
              "original": truncated_loss(model, layers, {}, heldout)}
    for label, kept in (("all truncated", set()), ("budget", set(decision.kept_whole)), ("skip at 0.1", skip_kept)):
        losses[label] = {"kept": len(kept),
                         "loss": truncated_loss(model, layers, {n: m for n, m in minors.items() if n not in kept}, heldout)}
    results["heldout_alpaca32"] = losses
    # The other way round: the budget fitted on the 32 answers, evaluated on the paragraph.
    fit = measure_truncation(model, layers, minors, heldout)
    crossed = choose_modules_to_keep(model, layers, minors, heldout, fit, TOLERANCE)
    kept = set(crossed.kept_whole)
    results["fitted_on_alpaca32"] = {
        "kept": len(kept), "kept_whole": sorted(kept), "forward_passes": crossed.forward_passes,
        "alpaca32": {"original": crossed.loss_original, "all truncated": crossed.loss_all_truncated,
                     "budget": crossed.loss_chosen},
        "paragraph": {"original": decision.loss_original,
                      "budget": truncated_loss(model, layers, {n: m for n, m in minors.items() if n not in kept}, batches)},
    }

print(json.dumps(results, indent=1))
