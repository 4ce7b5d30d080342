"""The building blocks of a float64 minor-subspace truncation, per model shape, against PEFT KaSA's SVD.

A certified truncation (issue 9) needs the float64 Gram matrix G (its small eigenvalues are below float32's
resolution of G) and a count of the eigenvalues below a bound. An iteration on G itself counts them with one
k×k ``ldl_factor`` of G − μI (Sylvester inertia) and needs a factorisation of G − sI besides; LAPACK's partial
solver counts them by bisection on the tridiagonal form (Sturm sequences, O(k) per count) after one Householder
reduction. This script times those building blocks, the dense path and the whole default ``partial_eigh`` path on
the weight shapes of a model preset, and PEFT KaSA's float32 full SVD of each weight, interleaved (round-robin,
``--repeats`` rounds, the median of the rounds):

    Gram-LDL floor = cast to float64 + Gram + one LDL       (an iteration on G, before any iteration)
    floor + Cholesky                                         (plus the shift-invert factorisation)
    dense = cast + Gram + eigh                               (``gram_eigh``)
    partial_eigh = the default path, whole (CPU only): cast, dsyrk Gram, dsyevr range 'I', check, factors

    python benchmarks/bench_truncation_floor.py --preset smollm2-135m --threads 1        # CPU
    python benchmarks/bench_truncation_floor.py --preset llama7b --device cuda --batch 4   # GPU

Timings are per batch of ``--batch`` same-shaped random matrices (the costs of these factorisations do not depend on
the values), scaled to the model's count of that shape. Prints a table; writes
benchmarks/results/truncation-floor-<device>-<time>.json.
"""

from __future__ import annotations

import argparse

import torch

from common import PRESETS, machine_info, median, timed, write_json

STEPS = ("peft_svd32", "cast64", "gram64", "eigh64", "cholesky64", "ldl64")
CPU_STEPS = ("syrk64", "partial_eigh")  # SciPy/LAPACK on the CPU only


def model_shapes(preset: str) -> list[tuple[tuple[int, int], int]]:
    """((out, in), count) of the all-linear targets of a LLaMA-shaped preset, one entry per distinct shape."""
    values = PRESETS[preset]
    hidden, inter, layers = values["hidden_size"], values["intermediate_size"], values["num_hidden_layers"]
    kv = hidden // values["num_attention_heads"] * values.get("num_key_value_heads", values["num_attention_heads"])
    counts: dict[tuple[int, int], int] = {}
    for shape in [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
                  (hidden, inter)]:
        counts[shape] = counts.get(shape, 0) + layers
    return list(counts.items())


def step_functions(weights32: torch.Tensor, r: int) -> dict:
    out_features, in_features = weights32.shape[-2:]
    weights64 = weights32.double()
    gram = weights64.mT @ weights64 if out_features >= in_features else weights64 @ weights64.mT
    k = gram.shape[-1]
    shift = 1e-3 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    steps = {
        # PEFT KaSA: torch.linalg.svd(weight.float(), full_matrices=False), one matrix at a time
        "peft_svd32": lambda: [torch.linalg.svd(w, full_matrices=False) for w in weights32],
        "cast64": lambda: weights32.double(),
        "gram64": lambda: weights64.mT @ weights64 if out_features >= in_features else weights64 @ weights64.mT,
        "eigh64": lambda: torch.linalg.eigh(gram),
        "cholesky64": lambda: torch.linalg.cholesky_ex(gram + shift * eye),
        "ldl64": lambda: torch.linalg.ldl_factor_ex(gram - shift * eye),
    }
    if weights32.device.type == "cpu":
        from kasa_peft.partial_eigh import gram_upper
        from kasa_peft.spectral import truncate_many

        arrays = [w.numpy() for w in weights64]
        steps["syrk64"] = lambda: [gram_upper(a) for a in arrays]
        steps["partial_eigh"] = lambda: truncate_many(list(weights32), r, "partial_eigh")
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="same-shaped matrices timed per step (scaled to the model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--r", type=int, default=16, help="rank dropped by the partial_eigh step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    steps = STEPS + (CPU_STEPS if args.device == "cpu" else ())
    rows, totals = [], {step: 0.0 for step in steps}
    for (out_features, in_features), count in model_shapes(args.preset):
        weights = torch.randn(args.batch, out_features, in_features, generator=generator) / in_features**0.5
        functions = step_functions(weights.to(args.device), args.r)
        samples: dict[str, list[float]] = {step: [] for step in steps}
        for step in steps:  # warm-up
            functions[step]()
        for _ in range(args.repeats):
            for step in steps:
                samples[step].append(timed(functions[step], args.device)[0])
        per_matrix = {step: median(samples[step]) / args.batch for step in steps}
        for step in steps:
            totals[step] += per_matrix[step] * count
        rows.append({"shape": [out_features, in_features], "count": count,
                     "ms_per_matrix": {step: 1e3 * value for step, value in per_matrix.items()}})

    peft = totals["peft_svd32"]
    summary = {
        "peft_svd32_s": peft,
        "dense_over_peft": (totals["cast64"] + totals["gram64"] + totals["eigh64"]) / peft,
        "floor_over_peft": (totals["cast64"] + totals["gram64"] + totals["ldl64"]) / peft,
        "floor_plus_cholesky_over_peft": (totals["cast64"] + totals["gram64"] + totals["ldl64"] + totals["cholesky64"]) / peft,
        "totals_s": totals,
    }
    if "partial_eigh" in totals:
        summary["partial_eigh_over_peft"] = totals["partial_eigh"] / peft
        summary["syrk_over_peft"] = totals["syrk64"] / peft
    header = "| shape (count) | " + " | ".join(f"{step} ms" for step in steps) + " |"
    print(header)
    print("|" + "---|" * (len(steps) + 1))
    for row in rows:
        cells = " | ".join(f"{row['ms_per_matrix'][step]:.2f}" for step in steps)
        print(f"| {row['shape'][0]} × {row['shape'][1]} ({row['count']}) | {cells} |")
    print(f"\nmodel totals (s): " + ", ".join(f"{step} {value:.2f}" for step, value in totals.items()))
    print(f"dense (cast + Gram + eigh) / PEFT SVD: {summary['dense_over_peft']:.3f}")
    print(f"Gram-LDL floor (cast + Gram + one LDL) / PEFT SVD: {summary['floor_over_peft']:.3f}")
    print(f"Gram-LDL floor + one Cholesky / PEFT SVD: {summary['floor_plus_cholesky_over_peft']:.3f}")
    if "partial_eigh_over_peft" in summary:
        print(f"partial_eigh, whole path / PEFT SVD: {summary['partial_eigh_over_peft']:.3f}")
    path = write_json("truncation-floor", {"machine": machine_info(args.device), "args": vars(args), "shapes": rows,
                                           "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
