"""Init and load time of KaSA adapters: kasa_peft (partial-eigh default, certified Krylov path, Gram+eigh path,
float64 SVD path) vs PEFT's KaSA and LoRA, timed interleaved (round-robin over methods, ``--repeats`` rounds) in one
process.

    python benchmarks/bench_init.py --preset smollm2-135m --ranks 16 --repeats 3        # CPU
    python benchmarks/bench_init.py --preset llama7b --device cuda --dtype bf16 --ranks 8,16,32   # GPU target

Prints a table and writes benchmarks/results/init-<device>-<time>.json. Also: per matrix shape, the truncation
alone (all same-shaped weights of the model, as at init) by the dense ``gram_eigh`` path vs the ``partial_eigh``
and ``krylov`` paths with their checked/certified/fallback counts and krylov's block solves (``--shape-table``,
interleaved too), and, on a few of the same matrices, the dropped component of the fast paths against a float64
full SVD. ``--threads N`` holds torch and (through it) SciPy's LAPACK to N threads.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from transformers import LlamaForCausalLM

from common import PRESETS, dtype_of, llama_config, machine_info, median, timed, write_json
from kasa_peft import KasaConfig, KasaModel, get_kasa_model
from kasa_peft.base_layers import is_supported, weight_matrix
from kasa_peft.spectral import (
    TruncationReport,
    minor_components_gram_eigh,
    minor_components_krylov,
    minor_components_partial_eigh,
    minor_components_svd,
    principal_angle_cosine,
    truncate_many,
)

METHODS = ("kasa-partial", "kasa-krylov", "kasa-fast", "kasa-svd", "peft-kasa", "peft-lora")
TRUNCATION = {"kasa-partial": "partial_eigh", "kasa-krylov": "krylov", "kasa-fast": "gram_eigh", "kasa-svd": "svd"}


def build(config, device: str, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def wrap(method: str, model, r: int):
    import peft
    from peft.tuners.lora import KasaConfig as PeftKasaConfig

    if method.startswith("kasa"):
        config = KasaConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", truncation_method=TRUNCATION[method])
        return get_kasa_model(model, config)
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
        if is_supported(module) and "lm_head" not in name:
            shape = tuple(module.weight.shape)
            if shape in seen:
                continue
            seen.add(shape)
            w = weight_matrix(module).detach().double().cpu()
            ref = minor_components_svd(w, r)
            optimum = float(ref.singular_values.square().sum().sqrt())
            paths = (("partial_eigh", minor_components_partial_eigh(w, r)), ("gram_eigh", minor_components_gram_eigh(w, r)),
                     ("krylov", minor_components_krylov(w, r)))
            for path, fast in paths:
                rows.append({
                    "module": name, "shape": list(shape), "path": path,
                    "relative_error_of_dropped": float(torch.linalg.matrix_norm(fast.product() - ref.product())) / optimum,
                    "min_principal_cosine": principal_angle_cosine(fast.minor_vh.T, ref.minor_vh.T),
                    "energy_ratio": float(torch.linalg.matrix_norm(fast.product())) / optimum,
                })
            if len(rows) >= len(paths) * count:
                break
    return rows


def shape_table(model, r: int, device: str, repeats: int) -> list[dict]:
    """Per weight shape: truncation of all same-shaped targets (as at init), dense vs partial vs krylov, interleaved."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if is_supported(module) and "lm_head" not in name:
            groups.setdefault(tuple(module.weight.shape), []).append(weight_matrix(module).detach())
    rows = []
    for shape, weights in groups.items():
        times = {"gram_eigh": [], "partial_eigh": [], "krylov": []}
        reports = {method: TruncationReport() for method in times}
        for _ in range(repeats):
            for method in times:
                reports[method] = TruncationReport()
                seconds, _ = timed(lambda: truncate_many(weights, r, method, report=reports[method]), device)
                times[method].append(seconds)
        krylov, partial = reports["krylov"], reports["partial_eigh"]
        iterations = sorted(krylov.iterations)
        row = {"shape": list(shape), "count": len(weights), "dense_s": median(times["gram_eigh"]),
               "partial_s": median(times["partial_eigh"]), "krylov_s": median(times["krylov"]),
               "dense_all_s": times["gram_eigh"], "partial_all_s": times["partial_eigh"], "krylov_all_s": times["krylov"],
               "partial_checked": partial.certified, "partial_fallback": partial.fallback, "partial_direct": partial.direct,
               "certified": krylov.certified, "fallback": krylov.fallback, "direct": krylov.direct,
               "block_solves_min": iterations[0] if iterations else None,
               "block_solves_median": iterations[len(iterations) // 2] if iterations else None,
               "block_solves_max": iterations[-1] if iterations else None}
        row["partial_vs_dense"] = row["partial_s"] / row["dense_s"]
        row["krylov_vs_dense"] = row["krylov_s"] / row["dense_s"]
        rows.append(row)
        print(f"  {str(shape):14s} ×{len(weights):3d}  dense {row['dense_s']:7.3f} s  partial {row['partial_s']:7.3f} s "
              f"({row['partial_vs_dense']:.2f}×, checked {partial.certified}, fallback {partial.fallback}, "
              f"dense {partial.direct})  krylov {row['krylov_s']:7.3f} s ({row['krylov_vs_dense']:.2f}×, block solves "
              f"{row['block_solves_min']}–{row['block_solves_max']}, certified {krylov.certified}, fallback "
              f"{krylov.fallback}, direct {krylov.direct})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=None, help="Override the number of decoder layers.")
    parser.add_argument("--ranks", default="16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=1, help="Interleaved rounds (each round times every method once).")
    parser.add_argument("--accuracy-matrices", type=int, default=4)
    parser.add_argument("--no-load", action="store_true", help="Skip the save/load timing (halves the run time).")
    parser.add_argument("--shape-table", action="store_true", help="Also time the truncation alone per matrix shape.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (1 = steadier timings on a CPU shared with other jobs).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = llama_config(args.preset, args.layers)
    dtype = dtype_of(args.dtype)
    methods = args.methods.split(",")
    pristine = build(config, args.device, dtype)
    # Warm-up on a one-layer model of the same widths: first-call costs (kernels, lazy imports) stay out of the rows.
    warm = build(llama_config(args.preset, 1), args.device, dtype)
    for method in methods:
        wrap(method, copy.deepcopy(warm), int(args.ranks.split(",")[0]))
    rows = []
    for r in [int(x) for x in args.ranks.split(",")]:
        init_times = {method: [] for method in methods}
        load_times = {method: [] for method in methods}
        for round_index in range(args.repeats):  # round-robin: machine noise hits every method alike
            for method in methods:
                seconds, wrapped = timed(lambda: wrap(method, copy.deepcopy(pristine), r), args.device)
                init_times[method].append(seconds)
                if not args.no_load:
                    load_times[method].append(load_time(method, wrapped, copy.deepcopy(pristine), args.device))
                del wrapped
                print(f"round {round_index} r={r:3d} {method:11s} init {seconds:8.3f} s", flush=True)
        for method in methods:
            rows.append({"method": method, "r": r, "init_s": median(init_times[method]),
                         "load_s": median(load_times[method]) if load_times[method] else None,
                         "init_all_s": init_times[method], "load_all_s": load_times[method]})
    by_key = {(row["method"], row["r"]): row for row in rows}
    for row in rows:
        peft_kasa = by_key.get(("peft-kasa", row["r"]))
        if peft_kasa and row["method"].startswith("kasa"):
            row["init_speedup_vs_peft_kasa"] = peft_kasa["init_s"] / row["init_s"]
            row["init_ratio_to_peft_kasa"] = row["init_s"] / peft_kasa["init_s"]
            # Ratio within each round (same machine state), then the median over rounds.
            row["init_ratio_to_peft_kasa_per_round"] = [a / b for a, b in zip(row["init_all_s"], peft_kasa["init_all_s"])]
            if row["load_s"] is not None and peft_kasa["load_s"]:
                row["load_speedup_vs_peft_kasa"] = peft_kasa["load_s"] / row["load_s"]
    first_r = int(args.ranks.split(",")[0])
    shapes = None
    if args.shape_table:
        print("\nper matrix shape (truncation only, r = %d):" % first_r)
        shapes = shape_table(pristine, first_r, args.device, max(1, args.repeats))
    checks = accuracy(pristine, first_r, args.accuracy_matrices)
    payload = {"benchmark": "init", "machine": machine_info(args.device), "preset": args.preset,
               "layers": config.num_hidden_layers, "dtype": args.dtype, "repeats": args.repeats, "results": rows,
               "shape_table": shapes, "fast_path_accuracy": checks}
    nan = float("nan")
    print("\nmethod       r   init s   load s   init / peft-kasa (median of per-round ratios)")
    for row in rows:
        per_round = row.get("init_ratio_to_peft_kasa_per_round")
        print(f"{row['method']:11s} {row['r']:3d} {row['init_s']:8.3f} {row['load_s'] or nan:8.3f}"
              f"   {median(per_round) if per_round else nan:8.3f}")
    print("\nfast paths vs float64 SVD:")
    for check in checks:
        print(f"  {check['module']:34s} {check['path']:12s} {check['shape']}  rel.err {check['relative_error_of_dropped']:.1e}"
              f"  cos {check['min_principal_cosine']:.6f}  energy {check['energy_ratio']:.9f}")
    print(f"\nwrote {write_json('init', payload)}")


if __name__ == "__main__":
    main()
