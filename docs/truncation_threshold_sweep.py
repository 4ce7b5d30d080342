"""The threshold sweep of docs/truncation.md: SmolLM2 (r=8), calibration loss when the modules whose output change
exceeds a threshold are kept whole and the others truncated. Run: ``python docs/truncation_threshold_sweep.py``
(prints JSON; needs the packaged SmolLM2, see the README)."""

import json

from kasa_peft import KasaConfig, get_kasa_model
from kasa_peft.experiments.inspect_truncation import DEFAULT_CALIBRATION_TEXT, calibration_batches
from kasa_peft.experiments.models import load_model
from kasa_peft.truncation_report import adapter_minor_components, truncated_loss

loaded = load_model("smollm2", "causal", num_labels=0)
batches = calibration_batches(loaded.tokenizer, [DEFAULT_CALIBRATION_TEXT], causal=True)
results = {}
for targets in (["v_proj"], ["q_proj", "v_proj"]):
    model = get_kasa_model(loaded.model, KasaConfig(r=8, target_modules=targets, truncation_guard="off"))
    report = model.truncation_report(batches)
    layers, minors = adapter_minor_components(model)
    change = {m.name: m.output_change for m in report.modules}
    sweep = {"original": report.loss_original, "all truncated": report.loss_truncated}
    for threshold in (0.05, 0.1, 0.15, 0.2, 0.25):
        truncated = {name: minor for name, minor in minors.items() if change[name] <= threshold}
        sweep[f"kept whole if > {threshold}"] = {"kept": len(minors) - len(truncated),
                                                 "loss": truncated_loss(model, layers, truncated, batches)}
    results["+".join(targets)] = sweep
    loaded.model = model.unload()
print(json.dumps(results, indent=1))
