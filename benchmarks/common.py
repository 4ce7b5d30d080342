"""Shared helpers for the benchmarks: model shapes, machine/version info, timing, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

PRESETS = {
    # LLaMA-7B shape: the cost of init is set by the shapes, so random init is enough.
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000),
    "llama1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32, vocab_size=32000),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
}
RESULTS = Path(__file__).resolve().parent / "results"


def llama_config(preset: str, layers: int | None = None) -> LlamaConfig:
    values = dict(PRESETS[preset])
    if layers:
        values["num_hidden_layers"] = layers
    return LlamaConfig(**values, max_position_embeddings=2048)


def machine_info(device: str) -> dict:
    import peft
    import transformers

    import kasa_peft

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "kasa_peft": kasa_peft.__version__, "python": platform.python_version()},
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - start, value


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{payload['machine']['device']}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def dtype_of(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]
