"""``RunConfig``: one training run, from a YAML/JSON file and/or command-line flags.

Every field is validated and coerced by its annotation (pydantic, lax mode) whenever it is set — when a ``RunConfig``
is built from a file, from flags, by ``dataclasses.replace`` or directly, and on later assignment — so ``learning_rate: 1e-3`` in YAML (a string to PyYAML)
becomes a float, and ``batch_size: 0`` is refused naming the key. Ranges live in the annotations (``AtLeastOne``,
``PositiveFloat``, ...), so a new field with a plain type is type-checked without any extra code.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from .models import PACKAGED_MODELS, QUANTIZE_CHOICES, TINY_MODELS, ModelResolutionError, check_model_name

# Value ranges, as annotations pydantic enforces (NaN/inf refused for every bounded float).
AtLeastOne = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
StepLimit = Annotated[int, Field(ge=-1)]  # -1 (or 0): train for `epochs` instead
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
DropoutProbability = Annotated[float, Field(ge=0, lt=1)]  # p = 1 would drop every input
UnitFraction = Annotated[float, Field(ge=0, le=1)]
SmoothingEpsilon = Annotated[float, Field(ge=0, lt=1)]  # ε = 1 would leave no signal from the label
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
    method: str = field(default="kasa", metadata={"help": "kasa (this package), peft-kasa, lora, pissa, dora (PEFT), milora or full (experiments.methods.METHODS)."})
    model: str = field(default="minilm", metadata={"help": "minilm, smollm2, tiny-bert, tiny-llama, a local directory or a Hub id."})
    output_dir: str | None = field(default=None, metadata={"help": "Run directory (default runs/<task>-<method>-s<seed>)."})
    data_dir: str | None = field(default=None, metadata={"help": "Local data root (layout of shared/data); env KASA_DATA_DIR."})
    demo_data: bool = field(default=False, metadata={"help": "Use the SST-2 subset shipped with the package."})
    r: AtLeastOne = 8
    lora_alpha: PositiveFloat = 16
    lora_dropout: DropoutProbability = 0.0
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Default: q/v projections of the model."})
    beta: NonNegativeFloat = 1e-4
    gamma: NonNegativeFloat = 1e-3
    learning_rate: PositiveFloat = 5e-4
    full_learning_rate: PositiveFloat = 2e-5
    epochs: PositiveFloat = 1.0
    max_steps: StepLimit = -1
    batch_size: AtLeastOne = 16
    eval_batch_size: AtLeastOne = 32
    gradient_accumulation_steps: AtLeastOne = 1
    warmup_ratio: UnitFraction = 0.06
    weight_decay: NonNegativeFloat = 0.0
    max_length: AtLeastOne = 128
    train_limit: AtLeastOne | None = None
    eval_limit: AtLeastOne | None = None
    seed: NonNegativeInt = 0
    save_steps: AtLeastOne = 50
    logging_steps: AtLeastOne = 10
    num_beams: AtLeastOne | None = field(default=None, metadata={"help": "Beam width; default per task: E2E 10 (LoRA paper), commonsense 4 (LLM-Adapters), instruction 1."})
    max_new_tokens: AtLeastOne = 32
    judge_model: str | None = field(default=None, metadata={"help": "Optional local judge model for 'instruction'."})
    quantize: str | None = field(default=None, metadata={"help": "Load the base with bitsandbytes: '4bit' (nf4, double quant) or '8bit'; needs kasa-peft[quant]."})
    truncation_guard: str | None = field(default=None, metadata={"help": "kasa only: off, warn, skip or budget (KasaConfig.truncation_guard); default: the library's."})
    truncation_guard_loss_tolerance: PositiveFloat | None = field(default=None, metadata={"help": "kasa, truncation_guard budget only: relative tolerance on the calibration loss (0.05 = within 5 % of the original); default: the library's."})
    truncation_basis: str = field(default="weight", metadata={"help": "kasa only: weight (the paper) or activation (research variant, not the paper's method)."})
    calibration_examples: NonNegativeInt = field(default=16, metadata={"help": "kasa only: training examples fed to the truncation guard / activation basis (first N; 0 = none)."})
    # --- protocol fields (issue 7): presets set them; flags and config files override them.
    preset: str | None = field(default=None, metadata={"help": "quick (default: small CPU settings) or paper (the paper's protocol for the task)."})
    regularization_form: str = field(default="paper", metadata={"help": "KaSA regulariser: 'paper' (r×r Grams, summed) or 'authors' (their training script)."})
    warmup_steps: NonNegativeInt = field(default=0, metadata={"help": "Linear warm-up steps; when > 0 it replaces warmup_ratio."})
    label_smoothing: SmoothingEpsilon = field(default=0.0, metadata={"help": "Label smoothing ε of the training loss."})
    length_penalty: float = field(default=1.0, metadata={"help": "Beam-search length penalty (Hugging Face definition)."})
    no_repeat_ngram_size: NonNegativeInt = field(default=0, metadata={"help": "Forbid repeated n-grams of this size when decoding (0 = off)."})
    train_on_inputs: bool = field(default=False, metadata={"help": "Causal tasks: the prompt tokens are labels too (LLM-Adapters)."})
    step0_eval: bool = field(default=True, metadata={"help": "Evaluate before the first optimiser step (after KaSA's truncation)."})

    def __setattr__(self, name: str, value: Any) -> None:
        # Every assignment is validated — in __init__ (so also from_dict and dataclasses.replace) and afterwards
        # (`config.eval_limit = 0` is refused too, not read as "no limit").
        adapter = _field_validators(type(self)).get(name)
        if adapter is not None:
            try:
                value = _normalized(name, adapter.validate_python(value))
            except ValidationError as error:
                raise ConfigError(name, value, _reason(error)) from None
        object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        from .methods import METHODS  # torch + transformers: only once the plain values are valid

        if self.method not in METHODS:
            raise ConfigError("method", self.method, f"Unknown method; choose from {', '.join(METHODS)}")
        if self.task not in TASK_FAMILIES:
            raise ConfigError("task", self.task, f"Unknown task; choose from {', '.join(TASK_FAMILIES)}")
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise ConfigError("quantize", self.quantize, f"must be {' or '.join(map(repr, QUANTIZE_CHOICES))}")
        if self.quantize is not None and self.method in ("full", "peft-kasa"):
            raise ConfigError(
                "quantize", self.quantize,
                f"does not work with method {self.method!r}: "
                + ("a quantised base cannot be fully fine-tuned." if self.method == "full" else
                   "PEFT's KaSA silently trains plain LoRA on bitsandbytes layers; use method 'kasa'."),
            )
        from kasa_peft.config import TRUNCATION_BASES, TRUNCATION_GUARDS

        if self.truncation_guard is not None and self.truncation_guard not in TRUNCATION_GUARDS:
            raise ConfigError("truncation_guard", self.truncation_guard, f"must be one of {', '.join(TRUNCATION_GUARDS)}")
        if self.truncation_guard_loss_tolerance is not None and self.truncation_guard != "budget":
            raise ConfigError(
                "truncation_guard_loss_tolerance", self.truncation_guard_loss_tolerance,
                f"only used with truncation_guard budget (truncation_guard is {self.truncation_guard or 'the default, warn'}); "
                "set truncation_guard to budget or drop the tolerance",
            )
        if self.truncation_basis not in TRUNCATION_BASES:
            raise ConfigError("truncation_basis", self.truncation_basis, f"must be one of {', '.join(TRUNCATION_BASES)}")
        if self.regularization_form not in REGULARIZATION_FORMS:
            raise ConfigError(
                "regularization_form", self.regularization_form, f"must be one of {', '.join(REGULARIZATION_FORMS)}"
            )

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
        return Path(self.output_dir or Path(f"runs/{self.task}-{self.method}-s{self.seed}").resolve())

    @property
    def effective_learning_rate(self) -> float:
        return self.full_learning_rate if self.method == "full" else self.learning_rate

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "output_dir": str(self.run_dir)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(known)}"
                raise ConfigError(key, data[key], f"unknown run-config key; {hint}")
        return cls(**data)


class ConfigError(ValueError):
    """A run-config value is wrong. ``key`` is the field; the message names it, the value, and what is allowed."""

    def __init__(self, key: str, value: Any, reason: str, where: str | None = None) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{where or f'{key} = {value!r}'}: {reason}")

    def from_flag(self) -> "ConfigError":
        """The same error, naming the command-line flag the value came from: ``--batch-size 0: ...``."""
        return ConfigError(self.key, self.value, self.reason, f"{flag_name(self.key)} {self.value}")

    def from_file(self, path: str | Path) -> "ConfigError":
        """The same error, naming the config file and key: ``run.yaml: batch_size = 0: ...``."""
        return ConfigError(self.key, self.value, self.reason, f"{path}: {self.key} = {self.value!r}")


@functools.cache
def _field_validators(cls: type) -> dict[str, TypeAdapter]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: TypeAdapter(hints[f.name]) for f in dataclasses.fields(cls)}


def _reason(error: ValidationError) -> str:
    """pydantic's messages without its framing: 'Input should be ≥ 1' → 'must be ≥ 1'."""
    messages = dict.fromkeys(e["msg"].replace("Input should be", "must be") for e in error.errors())
    return " or ".join(messages)


def _absolute(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else path


def _normalized(name: str, value: Any) -> Any:
    """One canonical form per value: absolute paths (so `kasa eval RUN` works from any working directory) and
    comma-separated target modules as a list."""
    if name in ("output_dir", "data_dir"):
        return _absolute(value)
    if name == "model" and value not in (*PACKAGED_MODELS, *TINY_MODELS) and Path(value).expanduser().exists():
        return _absolute(value)
    if name == "target_modules" and isinstance(value, str) and "," in value:
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


class ConfigFileError(ValueError):
    """A run-config file cannot be read or parsed; the message names the file (and line)."""


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON run config (a flat mapping of RunConfig fields)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"--config {path}: Config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigFileError(f"--config {path}: not a UTF-8 text file; pass a YAML or JSON file") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigFileError(f"{where}: invalid YAML ({problem})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigFileError(f"{path}:{error.lineno}: invalid JSON ({error.msg}); YAML files need a .yaml suffix") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path} must hold a mapping of run-config keys, not a {type(data).__name__}.")
    return data


def build_config(config_file: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Preset values first, then the file's, then every override that is not None (flags win over the file).

    The preset (``preset`` from the file or a flag, default ``quick``) is resolved for the run's task; an unknown
    preset, or one the task does not have, is a one-line error naming the valid ones. A wrong value is reported as
    the flag (``--batch-size 0: ...``) or the file key (``run.yaml: batch_size = 0: ...``) it came from, else as the
    preset's key.
    """
    from .presets import DEFAULT_PRESET, resolve_preset

    data = load_config_file(config_file) if config_file else {}
    flags = {k: v for k, v in overrides.items() if v is not None}
    data.update(flags)
    try:
        if isinstance(data.get("model"), str):
            try:  # before anything imports the deep-learning stack: a mistyped name fails fast
                check_model_name(data["model"])
            except ModelResolutionError as error:
                raise ConfigError("model", data["model"], error.reason) from None
        task = data.get("task", RunConfig.task)
        if task not in TASK_FAMILIES:
            raise ConfigError("task", task, f"Unknown task; choose from {', '.join(TASK_FAMILIES)}")
        preset = data.get("preset") or DEFAULT_PRESET
        return RunConfig.from_dict({**resolve_preset(task, preset), **data, "preset": preset})
    except ConfigError as error:
        if error.key in flags or (not config_file and error.key not in data):
            raise error.from_flag() from None
        if config_file and error.key in data:
            raise error.from_file(config_file) from None
        raise
