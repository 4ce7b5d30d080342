"""``RunConfig``: one training run, from a YAML/JSON file and/or command-line flags."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import METHODS
from .tasks import task_families

GLUE_TASK_NAMES = ("cola", "sst2", "mrpc", "stsb", "rte", "qnli")
COMMONSENSE_TASK_NAMES = (
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
)
#: ``{task: family}``, from the task families registered in ``experiments.tasks``.
TASK_FAMILIES = task_families()
REGULARIZATION_FORMS = ("paper", "authors")


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
    # --- protocol fields (issue 7): presets set them; flags and config files override them.
    preset: str | None = field(default=None, metadata={"help": "quick (default: small CPU settings) or paper (the paper's protocol for the task)."})
    regularization_form: str = field(default="paper", metadata={"help": "KaSA regulariser: 'paper' (r×r Grams, summed) or 'authors' (their training script)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps; when > 0 it replaces warmup_ratio."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing ε of the training loss."})
    length_penalty: float = field(default=1.0, metadata={"help": "Beam-search length penalty (Hugging Face definition)."})
    no_repeat_ngram_size: int = field(default=0, metadata={"help": "Forbid repeated n-grams of this size when decoding (0 = off)."})
    train_on_inputs: bool = field(default=False, metadata={"help": "Causal tasks: the prompt tokens are labels too (LLM-Adapters)."})
    step0_eval: bool = field(default=True, metadata={"help": "Evaluate before the first optimiser step (after KaSA's truncation)."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose from {', '.join(METHODS)}.")
        if self.task not in TASK_FAMILIES:
            raise ValueError(f"Unknown task {self.task!r}; choose from {', '.join(TASK_FAMILIES)}.")
        if self.regularization_form not in REGULARIZATION_FORMS:
            raise ValueError(f"regularization_form must be one of {', '.join(REGULARIZATION_FORMS)}, got {self.regularization_form!r}.")
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
    """Preset values first, then the file's, then every override that is not None (flags win over the file).

    The preset (``preset`` from the file or a flag, default ``quick``) is resolved for the run's task; an unknown
    preset, or one the task does not have, is a one-line error naming the valid ones.
    """
    from .presets import DEFAULT_PRESET, resolve_preset

    data = load_config_file(config_file) if config_file else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    task = data.get("task", RunConfig.task)
    if task not in TASK_FAMILIES:
        raise ValueError(f"Unknown task {task!r}; choose from {', '.join(TASK_FAMILIES)}.")
    preset = data.get("preset") or DEFAULT_PRESET
    return RunConfig.from_dict({**resolve_preset(task, preset), **data, "preset": preset})
