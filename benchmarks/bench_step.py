"""Training-step time and peak memory: PEFT LoRA vs PEFT KaSA (+ its regulariser) vs kasa_peft (+ regulariser).

    python benchmarks/bench_step.py --preset smollm2-135m --batch 4 --seq 128            # CPU (report ratios)
    python benchmarks/bench_step.py --preset llama1b --batch 8 --seq 512 --device cuda    # H100 target

All methods live in one process and are timed interleaved (round-robin) after warm-up; the step is
forward + backward + AdamW. Peak GPU memory is measured per method in a separate pass with only that model on
the device. ``--profile METHOD`` adds a torch.profiler table of the top ops for one method to the JSON.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import LlamaForCausalLM

from common import PRESETS, dtype_of, llama_config, machine_info, median, sync, timed, write_json
from kasa_peft import KasaConfig, get_kasa_model

METHODS = ("peft-lora", "peft-kasa", "kasa")


def prepare(method: str, base, r: int):
    import peft
    from peft.tuners.lora import KasaConfig as PeftKasaConfig

    if method == "kasa":
        model = get_kasa_model(base, KasaConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
        return model, model.regularization_loss
    kasa = PeftKasaConfig() if method == "peft-kasa" else None
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", kasa_config=kasa))
    return model, (model.base_model._get_kasa_loss if kasa is not None else None)


def make_step(model, regularizer, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        if regularizer is not None:
            loss = loss + regularizer()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--profile", default=None, help="Also profile this method for a few steps.")
    args = parser.parse_args()
    methods = args.methods.split(",")
    config = llama_config(args.preset, args.layers)
    torch.manual_seed(0)
    with torch.device(args.device):
        base = LlamaForCausalLM(config).to(dtype_of(args.dtype))
    base.config.use_cache = False
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)
    steps = {}
    for method in methods:
        model, regularizer = prepare(method, copy.deepcopy(base), args.r)
        model.train()
        steps[method] = (model, make_step(model, regularizer, batch))
    del base
    for method in methods:
        for _ in range(args.warmup):
            steps[method][1]()
    times = {method: [] for method in methods}
    for _ in range(args.rounds):
        for method in methods:  # interleaved: drift of the machine hits every method alike
            seconds, _ = timed(steps[method][1], args.device)
            times[method].append(seconds)
    memory = {}
    if args.device == "cuda":
        for method in methods:
            for other in methods:
                steps[other][0].to("cpu" if other != method else "cuda")
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            steps[method][1]()
            sync(args.device)
            memory[method] = torch.cuda.max_memory_allocated() / 2**30
    reference = median(times[methods[0]])
    rows = [{"method": m, "median_step_s": median(times[m]), "ratio_vs_" + methods[0]: median(times[m]) / reference,
             "all_steps_s": times[m], "peak_memory_gib": memory.get(m)} for m in methods]
    profile = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile as run_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with run_profile(activities=activities) as prof:
            for _ in range(3):
                steps[args.profile][1]()
        sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
        profile = prof.key_averages().table(sort_by=sort, row_limit=25)
        print(profile)
    payload = {"benchmark": "step", "machine": machine_info(args.device), "preset": args.preset,
               "layers": config.num_hidden_layers, "batch": args.batch, "seq": args.seq, "r": args.r,
               "dtype": args.dtype, "results": rows, "profile": profile}
    print(f"\n{'method':10s} {'median step s':>14s} {'× ' + methods[0]:>14s} {'peak GiB':>9s}")
    for row in rows:
        peak = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else "–"
        print(f"{row['method']:10s} {row['median_step_s']:14.4f} {row['ratio_vs_' + methods[0]]:14.3f} {peak:>9s}")
    print(f"\nwrote {write_json('step', payload)}")


if __name__ == "__main__":
    main()
