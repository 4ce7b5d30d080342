"""Re-evaluate a finished run's adapter, and merge an adapter into its base model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kasa_peft import KasaModel
from kasa_peft.checkpoint import atomic_write_text
from kasa_peft.config import CONFIG_NAME

from .models import load_model
from .rundir import check_output_folder, write_output_folder
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


def evaluate_run(run_dir: Path, eval_limit: int | None = None, eval_file: Path | None = None,
                 data_dir: str | None = None) -> dict[str, float]:
    """Load the run's base model + saved adapter and evaluate it; returns the metrics.

    Without ``eval_file``: the task's dev/test split (only that split is read, from ``data_dir`` or the run's),
    written to ``run_dir/eval.json``. With ``eval_file``: a user's labelled file in the task's layout (GLUE dev-file
    layouts, E2E LoRA-format or ``testset_w_refs.csv``, an LLM-Adapters JSON list), written to
    ``run_dir/eval_<file stem>.json`` with outputs under ``run_dir/eval_<file stem>/``. Training data are never read.
    """
    from .tasks import family_of

    run_dir = Path(run_dir)
    config = _read_run_config(run_dir)
    if config.method == "full":
        raise ValueError("Full fine-tuning runs keep no separate adapter; evaluate their last checkpoint instead.")
    if eval_limit is not None:
        config.eval_limit = eval_limit
    if data_dir is not None:
        config.data_dir = str(data_dir)
    family = family_of(config.task)
    if eval_file is not None:
        eval_file = Path(eval_file)
        if not eval_file.is_file():
            raise FileNotFoundError(f"--eval-file not found: {eval_file}")
        eval_data = family.load_eval_file(config, eval_file)
        out_dir, record = run_dir / f"eval_{eval_file.stem}", run_dir / f"eval_{eval_file.stem}.json"
    else:
        eval_data = family.load_eval(config)
        out_dir, record = run_dir, run_dir / "eval.json"
    loaded = load_model(config.model, family.kind, num_labels=family.num_labels(config.task), quantize=config.quantize)
    model = attach_adapter(loaded.model, run_dir / "adapter").eval()
    metrics = family.evaluate(model, loaded.tokenizer, config, eval_data, out_dir)
    payload = {**metrics, **({"eval_file": str(eval_file.resolve())} if eval_file is not None else {})}
    atomic_write_text(record, json.dumps(payload, indent=2))
    return payload


def merge_adapter(adapter_dir: Path, output_dir: Path, model_name: str | None = None, overwrite: bool = False) -> Path:
    """Merge ``adapter_dir`` into its base (recorded in the run's config.json unless given) and save it.

    ``output_dir`` must be new or empty, or (with ``overwrite``) an earlier merged model: see
    :func:`~kasa_peft.experiments.rundir.write_output_folder`.
    """
    adapter_dir = Path(adapter_dir)
    check_output_folder(output_dir, "merged model", overwrite)
    run_config = adapter_dir.parent / "config.json"
    task_kind, num_labels = "causal", 2
    if run_config.is_file():
        config = _read_run_config(adapter_dir.parent)
        model_name = model_name or config.model
        from .tasks import family_of

        family = family_of(config.task)
        task_kind, num_labels = family.kind, family.num_labels(config.task)
    if model_name is None:
        raise ValueError("Pass --model: the adapter directory is not inside a run directory with a config.json.")
    loaded = load_model(model_name, task_kind, num_labels=num_labels)
    merged = attach_adapter(loaded.model, adapter_dir).merge_and_unload()

    def write(folder: Path) -> None:
        merged.save_pretrained(str(folder))
        loaded.tokenizer.save_pretrained(str(folder))

    return write_output_folder(output_dir, write, kind="merged model", overwrite=overwrite)
