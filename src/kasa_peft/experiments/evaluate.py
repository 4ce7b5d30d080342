"""Re-evaluate a finished run's adapter, and merge an adapter into its base model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kasa_peft import KasaModel
from kasa_peft.checkpoint import atomic_write_text
from kasa_peft.config import CONFIG_NAME

from .models import load_model
from .runconfig import RunConfig


def _read_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a run directory written by `kasa train`.")
    record = json.loads(path.read_text())
    fields = set(RunConfig.__dataclass_fields__)
    return RunConfig.from_dict({k: v for k, v in record.items() if k in fields})


def attach_adapter(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Our adapter format, or PEFT's (``adapter_config.json``) for the baselines."""
    if (adapter_dir / CONFIG_NAME).is_file():
        return KasaModel.from_pretrained(base, adapter_dir)
    if (adapter_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(adapter_dir))
    raise FileNotFoundError(f"No adapter in {adapter_dir} (expected {CONFIG_NAME} or adapter_config.json).")


def evaluate_run(run_dir: Path, eval_limit: int | None = None) -> dict[str, float]:
    """Load the run's base model + saved adapter and evaluate on the task's dev/test data; writes eval.json."""
    from .runner import FAMILY_SETUPS

    run_dir = Path(run_dir)
    config = _read_run_config(run_dir)
    if config.method == "full":
        raise ValueError("Full fine-tuning runs keep no separate adapter; evaluate their last checkpoint instead.")
    if eval_limit is not None:
        config.eval_limit = eval_limit
    holder: dict = {}
    setup = FAMILY_SETUPS[config.family](config, holder)
    loaded = load_model(config.model, setup.kind, num_labels=setup.num_labels, quantize=config.quantize)
    model = attach_adapter(loaded.model, run_dir / "adapter").eval()
    if setup.compute_metrics is not None:
        metrics = _classification_metrics(model, loaded.tokenizer, setup, holder, config)
    else:
        metrics = setup.evaluate(model, loaded.tokenizer, config, run_dir)
    atomic_write_text(run_dir / "eval.json", json.dumps(metrics, indent=2))
    return metrics


@torch.no_grad()
def _classification_metrics(model, tokenizer, setup, holder, config) -> dict[str, float]:
    import numpy as np

    items = holder["encode"](setup.eval_items, tokenizer)
    collator = setup.collator_factory(tokenizer)
    logits, labels = [], []
    for start in range(0, len(items), config.eval_batch_size):
        batch = collator([dict(item) for item in items[start : start + config.eval_batch_size]])
        labels.append(batch.pop("labels").numpy())
        logits.append(model(**batch).logits.float().numpy())
    return setup.compute_metrics((np.concatenate(logits), np.concatenate(labels)))


def merge_adapter(adapter_dir: Path, output_dir: Path, model_name: str | None = None) -> Path:
    """Merge ``adapter_dir`` into its base (recorded in the run's config.json unless given) and save it."""
    adapter_dir = Path(adapter_dir)
    run_config = adapter_dir.parent / "config.json"
    task_kind, num_labels = "causal", 2
    if run_config.is_file():
        config = _read_run_config(adapter_dir.parent)
        model_name = model_name or config.model
        task_kind = "classification" if config.family == "glue" else "causal"
        num_labels = 1 if config.task == "stsb" else 2
    if model_name is None:
        raise ValueError("Pass --model: the adapter directory is not inside a run directory with a config.json.")
    loaded = load_model(model_name, task_kind, num_labels=num_labels)
    merged = attach_adapter(loaded.model, adapter_dir).merge_and_unload()
    output_dir = Path(output_dir)
    merged.save_pretrained(str(output_dir))
    loaded.tokenizer.save_pretrained(str(output_dir))
    return output_dir
