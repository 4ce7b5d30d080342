"""``KasaConfig``: everything that defines one KaSA (or plain LoRA) adapter, JSON-serialisable."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .checkpoint import AdapterFileError, read_json_object
from .spectral import TRUNCATION_METHODS

CONFIG_NAME = "kasa_config.json"
REGULARIZATION_FORMS = ("paper", "authors")
ADAPTER_TYPES = ("kasa", "lora")
TRUNCATION_GUARDS = ("off", "warn", "skip", "budget")
TRUNCATION_BASES = ("weight", "activation")


@dataclass
class KasaConfig:
    """Configuration of a KaSA adapter (Wang et al., ICLR 2025, arXiv 2412.06071).

    The adapted layer computes ``y = W_world x + (α/r)·B·diag(σ)·A·x`` with ``W_world = W − U_r Σ_r V_rᵀ``; the
    frozen weight ``W`` itself is never modified, so disabling or unloading the adapter restores the original model.
    """

    r: int = field(default=8, metadata={"help": "Adapter rank r: also the number of smallest singular triplets dropped."})
    lora_alpha: float = field(default=16, metadata={"help": "Scaling numerator: the update is scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input (not on the truncation)."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules to adapt: a list of names (exact or suffix match, e.g. ['q_proj', 'v_proj']), a regex "
            "string (full match on the module path), or 'all-linear' (every Linear/Conv1D but the output layer and task heads such as classifier/score)."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never to adapt; same matching rules as target_modules."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Extra modules (e.g. a classification head) trained in full and saved with the adapter; each "
            "adapter gets its own copy, so the original stays intact."
        },
    )
    beta: float = field(default=1e-4, metadata={"help": "β: weight of the singular-value penalty Σσ²."})
    gamma: float = field(
        default=1e-3, metadata={"help": "γ: weight of the orthogonality penalty ‖AAᵀ−I‖_F + ‖BᵀB−I‖_F."}
    )
    regularization_form: Literal["paper", "authors"] = field(
        default="paper",
        metadata={
            "help": "'paper': β·Σσ² + γ·(‖AAᵀ−I_r‖_F + ‖BᵀB−I_r‖_F) summed over layers. 'authors': the released "
            "training script's form (‖AᵀA−I_in‖_F + ‖BBᵀ−I_out‖_F, everything averaged over modules), only for "
            "replicating their numbers."
        },
    )
    truncation_method: Literal["partial_eigh", "gram_eigh", "svd", "krylov"] = field(
        default="partial_eigh",
        metadata={
            "help": "How to find the minor components: 'partial_eigh' (float64 Gram + LAPACK's partial eigensolver for "
            "the r smallest eigenpairs only, checked; the default, 2.1–2.4× faster init than gram_eigh on CPU; off the CPU it "
            "runs gram_eigh), 'gram_eigh' (float64 Gram + full eigh), 'svd' (float64 full SVD, reference) or 'krylov' "
            "(float64 Gram + certified iterative solver for the r smallest eigenpairs). Matrices that partial_eigh or "
            "krylov cannot check/certify are recomputed by gram_eigh and logged."
        },
    )
    truncate: bool = field(
        default=True, metadata={"help": "Drop the r minor components from the base (False = ablation without truncation)."}
    )
    adapter_type: Literal["kasa", "lora"] = field(
        default="kasa",
        metadata={"help": "'kasa', or 'lora' for a plain LoRA adapter (no truncation, no σ) living in the same model."},
    )
    truncation_guard: Literal["off", "warn", "skip", "budget"] = field(
        default="warn",
        metadata={
            "help": "What to do, when calibration_batches are passed at creation, with modules whose truncation "
            "changes their calibration output by more than truncation_guard_max_output_change (or, if set, the "
            "calibration loss by more than truncation_guard_max_loss_increase): 'off' (the paper: truncate all, "
            "measure nothing), 'warn' (truncate all, warn naming them), 'skip' (keep those modules untruncated; "
            "they are recorded in truncation_skipped_modules). 'budget' ignores both thresholds: it keeps the "
            "fewest modules whole, in order of output change, such that the calibration loss stays within "
            "truncation_guard_loss_tolerance of the original model's (needs labelled batches; at most "
            "2 + ceil(log2 n) calibration passes for n modules; recorded in truncation_skipped_modules). "
            "See docs/truncation.md."
        },
    )
    truncation_guard_max_output_change: float = field(
        default=0.1,
        metadata={
            "help": "Guard threshold in (0, 1): largest allowed relative output change ||W_minor X||_F / ||W X||_F "
            "of one module on the calibration inputs X."
        },
    )
    truncation_guard_max_loss_increase: float | None = field(
        default=None,
        metadata={
            "help": "Optional second guard threshold (> 0): largest allowed calibration-loss increase when only that "
            "module is truncated (one extra forward pass per module; the batches need labels)."
        },
    )
    truncation_guard_loss_tolerance: float = field(
        default=0.05,
        metadata={
            "help": "truncation_guard='budget' only: relative tolerance (> 0) on the whole model's calibration loss; "
            "the guard keeps modules whole until loss <= L_orig + tolerance*|L_orig| (0.05 = within 5 %)."
        },
    )
    truncation_basis: Literal["weight", "activation"] = field(
        default="weight",
        metadata={
            "help": "'weight' (the paper): drop the r smallest singular triplets of W. 'activation' (research "
            "variant, NOT the paper's method): drop the r minor components of W·C^{1/2}, C the input second moment "
            "on calibration_batches (required). See kasa_peft.activation_basis."
        },
    )
    activation_damping: float = field(
        default=0.01,
        metadata={
            "help": "truncation_basis='activation' only: C is damped to C + δ·mean(eig C)·I; δ > 0. Large δ tends to "
            "the weight basis."
        },
    )
    truncation_skipped_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Full module paths kept untruncated (their adapter still trains, σ included). Filled in by "
            "truncation_guard='skip' and saved with the adapter, so loading reproduces it; may also be set by hand."
        },
    )
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Recorded for provenance only."})

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"KasaConfig.r must be a positive integer, got {self.r!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"KasaConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.beta < 0 or self.gamma < 0:
            raise ValueError(f"KasaConfig.beta and gamma must be >= 0, got beta={self.beta}, gamma={self.gamma}.")
        if self.regularization_form not in REGULARIZATION_FORMS:
            raise ValueError(
                f"KasaConfig.regularization_form must be one of {REGULARIZATION_FORMS}, got {self.regularization_form!r}."
            )
        if self.truncation_method not in TRUNCATION_METHODS:
            raise ValueError(
                f"KasaConfig.truncation_method must be one of {TRUNCATION_METHODS}, got {self.truncation_method!r}."
            )
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"KasaConfig.adapter_type must be one of {ADAPTER_TYPES}, got {self.adapter_type!r}.")
        if self.truncation_guard not in TRUNCATION_GUARDS:
            raise ValueError(f"KasaConfig.truncation_guard must be one of {TRUNCATION_GUARDS}, got {self.truncation_guard!r}.")
        threshold = self.truncation_guard_max_output_change
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) < 1.0:
            raise ValueError(
                f"KasaConfig.truncation_guard_max_output_change must be a number in (0, 1), got {threshold!r}."
            )
        loss_threshold = self.truncation_guard_max_loss_increase
        if loss_threshold is not None and (
            isinstance(loss_threshold, bool) or not isinstance(loss_threshold, (int, float)) or not float(loss_threshold) > 0
            or loss_threshold == float("inf")
        ):
            raise ValueError(
                f"KasaConfig.truncation_guard_max_loss_increase must be None or a finite number > 0, got {loss_threshold!r}."
            )
        tolerance = self.truncation_guard_loss_tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 < float(tolerance) < float("inf"):
            raise ValueError(f"KasaConfig.truncation_guard_loss_tolerance must be a finite number > 0, got {tolerance!r}.")
        if self.truncation_basis not in TRUNCATION_BASES:
            raise ValueError(f"KasaConfig.truncation_basis must be one of {TRUNCATION_BASES}, got {self.truncation_basis!r}.")
        damping = self.activation_damping
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0.0 < float(damping) < float("inf"):
            raise ValueError(f"KasaConfig.activation_damping must be a finite number > 0, got {damping!r}.")
        if self.truncation_skipped_modules is not None:
            if isinstance(self.truncation_skipped_modules, str) or not all(
                isinstance(name, str) for name in self.truncation_skipped_modules
            ):
                raise ValueError(
                    "KasaConfig.truncation_skipped_modules must be a list of module paths (strings), got "
                    f"{self.truncation_skipped_modules!r}."
                )
            self.truncation_skipped_modules = sorted(set(self.truncation_skipped_modules))
        if self.target_modules is None:
            raise ValueError(
                "KasaConfig.target_modules is required: pass module names (e.g. ['q_proj', 'v_proj']), a regex, "
                "or 'all-linear'."
            )
        # JSON has lists only: sets (PEFT's own type for these fields) and tuples become lists here, so that a
        # config that builds also saves; sets are sorted to make the file reproducible.
        self.target_modules = _as_json_names(self.target_modules)
        self.exclude_modules = _as_json_names(self.exclude_modules)
        self.modules_to_save = _as_json_names(self.modules_to_save)

    @property
    def scaling(self) -> float:
        return float(self.lora_alpha) / self.r

    @property
    def uses_truncation(self) -> bool:
        return self.adapter_type == "kasa" and self.truncate

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["config_type"] = "kasa_peft.KasaConfig"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KasaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"config_type", "kasa_peft_version"})
        if unknown:
            warnings.warn(f"KasaConfig: ignoring unknown keys {unknown} (written by a newer kasa_peft?).", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "KasaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No KaSA adapter config at {path}; expected a directory written by save_pretrained.")
        data = read_json_object(path)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise AdapterFileError(f"{path}: invalid adapter config: {error}") from None

    from_pretrained = from_json_file


def _as_json_names(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


# peft.LoraConfig fields that config_from_peft_lora carries over, and those that do not change what the adapter
# computes (bookkeeping, runtime options, options read only together with another, non-default one). Every other
# field must keep its default, or the translation would silently compute something else than PEFT.
_LORA_FIELDS_TRANSLATED = frozenset(
    {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save", "kasa_config"}
)
_LORA_FIELDS_WITHOUT_EFFECT = frozenset(
    {
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "runtime_config", "megatron_core", "qalora_group_size", "ensure_weight_tying",
        # PEFT's flag for Conv1D's (in × out) storage; our layers read the layer type itself.
        "fan_in_fan_out",
    }
)


def config_from_peft_lora(lora_config: Any) -> KasaConfig:
    """Translate a plain ``peft.LoraConfig`` (default init, no variant) into an ``adapter_type='lora'`` config.

    Raises ``ValueError`` for LoRA features this package does not implement, rather than silently dropping them.
    """
    defaults = type(lora_config)()
    unsupported = [
        f"{f.name}={getattr(lora_config, f.name)!r}"
        for f in dataclasses.fields(lora_config)
        if f.name not in _LORA_FIELDS_TRANSLATED | _LORA_FIELDS_WITHOUT_EFFECT
        and getattr(lora_config, f.name) != getattr(defaults, f.name)
    ]
    if getattr(lora_config, "kasa_config", None) is not None:
        unsupported.append("kasa_config (use kasa_peft.KasaConfig for KaSA)")
    if unsupported:
        raise ValueError(
            f"peft.LoraConfig options not supported in a kasa_peft model: {', '.join(unsupported)}. "
            "Use a plain LoraConfig (default init) or peft's own get_peft_model."
        )
    return KasaConfig(
        r=lora_config.r,
        lora_alpha=lora_config.lora_alpha,
        lora_dropout=lora_config.lora_dropout,
        target_modules=lora_config.target_modules,
        exclude_modules=lora_config.exclude_modules,
        modules_to_save=list(lora_config.modules_to_save) if lora_config.modules_to_save else None,
        adapter_type="lora",
        truncate=False,
    )
