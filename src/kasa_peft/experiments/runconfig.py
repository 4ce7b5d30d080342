"""``RunConfig``: one training run, from a YAML/JSON file and/or command-line flags."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import METHODS

GLUE_TASK_NAMES = ("cola", "sst2", "mrpc", "stsb", "rte", "qnli")
COMMONSENSE_TASK_NAMES = (
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
)
TASK_FAMILIES = {
    **{name: "glue" for name in GLUE_TASK_NAMES},
    "e2e": "e2e",
    "commonsense": "commonsense",
    **{name: "commonsense" for name in COMMONSENSE_TASK_NAMES},
    "instruction": "instruction",
}


@dataclass
class RunConfig:
    """Everything that defines a run; written to ``run_dir/config.json``."""

    task: str = field(default="sst2", metadata={"help": "GLUE task, 'e2e', 'commonsense' (all 8) or one of them, 'instruction'."})
    method: str = field(default="kasa", metadata={"help": f"One of {', '.join(METHODS)}."})
    model: str = field(default="minilm", metadata={"help": "minilm, smollm2, tiny-bert, tiny-llama, a local directory or a Hub id."})
    output_dir: str | None = field(default=None, metadata={"help": "Run directory (default runs/<task>-<method>-s<seed>)."})
    data_dir: str | None = field(default=None, metadata={"help": "Local data root (layout of shared/data); env KASA_DATA_DIR."})
    demo_data: bool = field(default=False, metadata={"help": "Use the SST-2 subset shipped with the package."})
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Default: q/v projections of the model."})
    beta: float = 1e-4
    gamma: float = 1e-3
    learning_rate: float = 5e-4
    full_learning_rate: float = 2e-5
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 16
    eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_length: int = 128
    train_limit: int | None = None
    eval_limit: int | None = None
    seed: int = 0
    save_steps: int = 50
    logging_steps: int = 10
    num_beams: int | None = field(default=None, metadata={"help": "Beam width; default per task: E2E 10 (LoRA paper), commonsense 4 (LLM-Adapters), instruction 1."})
    max_new_tokens: int = 32
    judge_model: str | None = field(default=None, metadata={"help": "Optional local judge model for 'instruction'."})
    truncation_guard: str | None = field(default=None, metadata={"help": "kasa only: off, warn or skip (KasaConfig.truncation_guard); default: the library's."})
    truncation_basis: str = field(default="weight", metadata={"help": "kasa only: weight (the paper) or activation (research variant, not the paper's method)."})
    calibration_examples: int = field(default=16, metadata={"help": "kasa only: training examples fed to the truncation guard / activation basis (first N)."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose from {', '.join(METHODS)}.")
        if self.task not in TASK_FAMILIES:
            raise ValueError(f"Unknown task {self.task!r}; choose from {', '.join(TASK_FAMILIES)}.")
        from kasa_peft.config import TRUNCATION_BASES, TRUNCATION_GUARDS

        if self.truncation_guard is not None and self.truncation_guard not in TRUNCATION_GUARDS:
            raise ValueError(f"truncation_guard must be one of {', '.join(TRUNCATION_GUARDS)}, got {self.truncation_guard!r}.")
        if self.truncation_basis not in TRUNCATION_BASES:
            raise ValueError(f"truncation_basis must be one of {', '.join(TRUNCATION_BASES)}, got {self.truncation_basis!r}.")
        if isinstance(self.target_modules, str) and "," in self.target_modules:
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]

    @property
    def beams(self) -> int:
        if self.num_beams is not None:
            return self.num_beams
        return {"e2e": 10, "commonsense": 4}.get(self.family, 1)

    @property
    def family(self) -> str:
        return TASK_FAMILIES[self.task]

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.task}-{self.method}-s{self.seed}")

    @property
    def effective_learning_rate(self) -> float:
        return self.full_learning_rate if self.method == "full" else self.learning_rate

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown run-config keys {unknown}; valid keys: {sorted(known)}.")
        return cls(**data)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON run config (a flat mapping of RunConfig fields)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of run-config keys, not {type(data).__name__}.")
    return data


def build_config(config_file: str | Path | None = None, **overrides: Any) -> RunConfig:
    """File values first, then every override that is not None (flags win over the file)."""
    data = load_config_file(config_file) if config_file else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig.from_dict(data)
