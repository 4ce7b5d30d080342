"""What any *certified* float64 minor-subspace method must pay at least, per model shape, against PEFT KaSA's SVD.

A certified truncation (issue 9) needs the float64 Gram matrix G (its small eigenvalues are below float32's
resolution of G) and one Sylvester-inertia count, i.e. one k×k ``ldl_factor`` of G − μI; a shift-invert iteration
needs a factorisation of G − sI besides. This script times those building blocks and the dense path on the weight
shapes of a model preset, and PEFT KaSA's float32 full SVD of each weight, interleaved (round-robin, ``--repeats``
rounds, the median of the rounds), so the table shows the floor below which no such method can go on this machine:

    floor = cast to float64 + Gram + one LDL          (no iteration at all)
    floor + Cholesky                                  (plus the shift-invert factorisation)
    dense = cast + Gram + eigh                        (today's ``gram_eigh`` default)

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


def step_functions(weights32: torch.Tensor) -> dict:
    out_features, in_features = weights32.shape[-2:]
    weights64 = weights32.double()
    gram = weights64.mT @ weights64 if out_features >= in_features else weights64 @ weights64.mT
    k = gram.shape[-1]
    shift = 1e-3 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    return {
        # PEFT KaSA: torch.linalg.svd(weight.float(), full_matrices=False), one matrix at a time
        "peft_svd32": lambda: [torch.linalg.svd(w, full_matrices=False) for w in weights32],
        "cast64": lambda: weights32.double(),
        "gram64": lambda: weights64.mT @ weights64 if out_features >= in_features else weights64 @ weights64.mT,
        "eigh64": lambda: torch.linalg.eigh(gram),
        "cholesky64": lambda: torch.linalg.cholesky_ex(gram + shift * eye),
        "ldl64": lambda: torch.linalg.ldl_factor_ex(gram - shift * eye),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="same-shaped matrices timed per step (scaled to the model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    rows, totals = [], {step: 0.0 for step in STEPS}
    for (out_features, in_features), count in model_shapes(args.preset):
        weights = torch.randn(args.batch, out_features, in_features, generator=generator) / in_features**0.5
        functions = step_functions(weights.to(args.device))
        samples: dict[str, list[float]] = {step: [] for step in STEPS}
        for step in STEPS:  # warm-up
            functions[step]()
        for _ in range(args.repeats):
            for step in STEPS:
                samples[step].append(timed(functions[step], args.device)[0])
        per_matrix = {step: median(samples[step]) / args.batch for step in STEPS}
        for step in STEPS:
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
    header = "| shape (count) | " + " | ".join(f"{step} ms" for step in STEPS) + " |"
    print(header)
    print("|" + "---|" * (len(STEPS) + 1))
    for row in rows:
        cells = " | ".join(f"{row['ms_per_matrix'][step]:.2f}" for step in STEPS)
        print(f"| {row['shape'][0]} × {row['shape'][1]} ({row['count']}) | {cells} |")
    print(f"\nmodel totals (s): " + ", ".join(f"{step} {value:.2f}" for step, value in totals.items()))
    print(f"dense (cast + Gram + eigh) / PEFT SVD: {summary['dense_over_peft']:.3f}")
    print(f"floor (cast + Gram + one LDL) / PEFT SVD: {summary['floor_over_peft']:.3f}")
    print(f"floor + one Cholesky / PEFT SVD: {summary['floor_plus_cholesky_over_peft']:.3f}")
    path = write_json("truncation-floor", {"machine": machine_info(args.device), "args": vars(args), "shapes": rows,
                                           "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
