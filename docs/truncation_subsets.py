"""SmolLM2 v_proj (r=8): calibration loss when modules over an output-change threshold are kept whole."""
import json, torch
from kasa_peft import KasaConfig, get_kasa_model
from kasa_peft.experiments.inspect_truncation import DEFAULT_CALIBRATION_TEXT, calibration_batches
from kasa_peft.experiments.models import load_model
from kasa_peft.truncation_report import adapter_minor_components, truncated_loss, collect_layer_statistics

loaded = load_model("smollm2", "causal", num_labels=0)
batches = calibration_batches(loaded.tokenizer, [DEFAULT_CALIBRATION_TEXT], causal=True)
out = {}
for targets in (["v_proj"], ["q_proj", "v_proj"]):
    model = get_kasa_model(loaded.model, KasaConfig(r=8, target_modules=targets, truncation_guard="off"))
    report = model.truncation_report(batches)
    layers, minors = adapter_minor_components(model)
    change = {m.name: m.output_change for m in report.modules}
    res = {"all": report.loss_truncated, "none": report.loss_original}
    for t in (0.05, 0.1, 0.15, 0.2, 0.25):
        kept = {n: mi for n, mi in minors.items() if change[n] <= t}
        res[f"skip>{t}"] = (truncated_loss(model, layers, kept, batches), len(minors) - len(kept))
    out["+".join(targets)] = res
    print(targets, res, flush=True)
    loaded.model = model.unload()
json.dump(out, open("/tmp/trunc_meas/subsets.json", "w"), indent=1)
