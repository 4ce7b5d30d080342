"""Init and load time of KaSA adapters: kasa_peft (Gram+eigh fast path, float64 SVD path) vs PEFT's KaSA and LoRA.

    python benchmarks/bench_init.py --preset smollm2-135m --ranks 16                 # CPU
    python benchmarks/bench_init.py --preset llama7b --device cuda --dtype bf16 --ranks 8,16,32   # H100 target

Prints a table and writes benchmarks/results/init-<device>-<time>.json. Also checks, on a few of the same
matrices, that the fast path's dropped component matches a float64 full SVD.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from transformers import LlamaForCausalLM

from common import PRESETS, dtype_of, llama_config, machine_info, median, timed, write_json
from kasa_peft import KasaConfig, KasaModel, get_kasa_model
from kasa_peft.layer import weight_matrix
from kasa_peft.spectral import minor_components_gram_eigh, minor_components_svd, principal_angle_cosine

METHODS = ("kasa-fast", "kasa-svd", "peft-kasa", "peft-lora")


def build(config, device: str, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def wrap(method: str, model, r: int):
    import peft
    from peft.tuners.lora import KasaConfig as PeftKasaConfig

    if method.startswith("kasa"):
        truncation = "gram_eigh" if method == "kasa-fast" else "svd"
        return get_kasa_model(model, KasaConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", truncation_method=truncation))
    kasa = PeftKasaConfig() if method == "peft-kasa" else None
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", kasa_config=kasa))


def load_time(method: str, wrapped, base, device: str) -> float:
    with tempfile.TemporaryDirectory() as directory:
        wrapped.save_pretrained(directory)
        if method.startswith("kasa"):
            seconds, _ = timed(lambda: KasaModel.from_pretrained(base, directory), device)
        else:
            import peft

            seconds, _ = timed(lambda: peft.PeftModel.from_pretrained(base, directory), device)
    return seconds


def accuracy(model, r: int, count: int) -> list[dict]:
    rows = []
    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            shape = tuple(module.weight.shape)
            if shape in seen:
                continue
            seen.add(shape)
            w = weight_matrix(module).detach().double().cpu()
            ref, fast = minor_components_svd(w, r), minor_components_gram_eigh(w, r)
            optimum = float(ref.singular_values.square().sum().sqrt())
            rows.append({
                "module": name, "shape": list(shape),
                "relative_error_of_dropped": float(torch.linalg.matrix_norm(fast.product() - ref.product())) / optimum,
                "min_principal_cosine": principal_angle_cosine(fast.minor_vh.T, ref.minor_vh.T),
                "energy_ratio": float(torch.linalg.matrix_norm(fast.product())) / optimum,
            })
            if len(rows) >= count:
                break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=None, help="Override the number of decoder layers.")
    parser.add_argument("--ranks", default="16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--accuracy-matrices", type=int, default=4)
    args = parser.parse_args()
    config = llama_config(args.preset, args.layers)
    dtype = dtype_of(args.dtype)
    pristine = build(config, args.device, dtype)
    # Warm-up on a one-layer model of the same widths: first-call costs (kernels, lazy imports) stay out of the rows.
    warm = build(llama_config(args.preset, 1), args.device, dtype)
    for method in args.methods.split(","):
        wrap(method, copy.deepcopy(warm), int(args.ranks.split(",")[0]))
    rows = []
    for r in [int(x) for x in args.ranks.split(",")]:
        for method in args.methods.split(","):
            init_times, load_times = [], []
            for _ in range(args.repeats):
                seconds, wrapped = timed(lambda: wrap(method, copy.deepcopy(pristine), r), args.device)
                init_times.append(seconds)
                load_times.append(load_time(method, wrapped, copy.deepcopy(pristine), args.device))
                del wrapped
            rows.append({"method": method, "r": r, "init_s": median(init_times), "load_s": median(load_times),
                         "init_all_s": init_times, "load_all_s": load_times})
            print(f"r={r:3d} {method:10s} init {median(init_times):8.3f} s   load {median(load_times):8.3f} s", flush=True)
    by_key = {(row["method"], row["r"]): row for row in rows}
    for row in rows:
        peft_kasa = by_key.get(("peft-kasa", row["r"]))
        if peft_kasa and row["method"].startswith("kasa"):
            row["init_speedup_vs_peft_kasa"] = peft_kasa["init_s"] / row["init_s"]
            row["load_speedup_vs_peft_kasa"] = peft_kasa["load_s"] / row["load_s"]
    checks = accuracy(pristine, int(args.ranks.split(",")[0]), args.accuracy_matrices)
    payload = {"benchmark": "init", "machine": machine_info(args.device), "preset": args.preset,
               "layers": config.num_hidden_layers, "dtype": args.dtype, "results": rows, "fast_path_accuracy": checks}
    print("\nmethod      r   init s   load s   init× vs peft-kasa  load× vs peft-kasa")
    for row in rows:
        print(f"{row['method']:10s} {row['r']:3d} {row['init_s']:8.3f} {row['load_s']:8.3f}"
              f"   {row.get('init_speedup_vs_peft_kasa', float('nan')):8.2f}           {row.get('load_speedup_vs_peft_kasa', float('nan')):8.2f}")
    print("\nfast path vs float64 SVD:")
    for check in checks:
        print(f"  {check['module']:40s} {check['shape']}  rel.err {check['relative_error_of_dropped']:.1e}"
              f"  cos {check['min_principal_cosine']:.6f}  energy {check['energy_ratio']:.6f}")
    print(f"\nwrote {write_json('init', payload)}")


if __name__ == "__main__":
    main()
