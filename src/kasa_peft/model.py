"""``KasaModel``: injects KaSA adapters into a model and manages them (PEFT-style API)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import checkpoint
from .config import CONFIG_NAME, KasaConfig, config_from_peft_lora
from . import base_layers
from .base_layers import layer_shape
from .layer import KasaAdapter, KasaLayer, ModulesToSaveWrapper
from .regularization import kasa_regularization
from .spectral import check_truncation_rank
from .truncation_guard import plan_truncation
from .targeting import find_modules_to_save, find_target_modules, get_submodule_parent

if TYPE_CHECKING:
    from .truncation_report import TruncationReport

_ADAPTER_TENSORS = ("lora_A", "lora_B", "sigma", "minor_u_sigma", "minor_vh")
_MODULES_TO_SAVE_PREFIX = "modules_to_save."


class KasaModel(nn.Module):
    """A model with KaSA adapters. ``base_model`` is the wrapped model; forward, generate and attributes pass through.

    Create with :func:`get_kasa_model` or :meth:`KasaModel.from_pretrained`.
    """

    # transformers.Trainer refuses to train a quantised model unless adapters are attached, which it detects by this
    # flag (set by its own PEFT integration); a KasaModel always carries its adapters.
    _hf_peft_config_loaded = True

    def __init__(
        self,
        model: nn.Module,
        config: KasaConfig | Any | None,
        adapter_name: str = "default",
        calibration_batches: Iterable[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, KasaConfig] = {}
        self.active_adapter: str | None = None
        # Adapters loaded with is_trainable=False: they stay frozen when active. Per adapter, as in PEFT, so loading
        # one for inference does not freeze the one being trained or any added later.
        self._inference_adapters: set[str] = set()
        if config is not None:
            self.add_adapter(adapter_name, config, calibration_batches=calibration_batches)
            self.set_adapter(adapter_name)

    # ------------------------------------------------------------------ pass-through
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the *wrapped* model's forward takes ``num_items_in_batch`` (read by transformers.Trainer)."""
        if hasattr(self.base_model, "accepts_loss_kwargs"):
            return bool(self.base_model.accepts_loss_kwargs)
        params = inspect.signature(self.base_model.forward).parameters.values()
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.base_model.gradient_checkpointing_enable(**kwargs)
        # Frozen embeddings give checkpointed blocks inputs without grad; adapters inside would get none.
        if hasattr(self.base_model, "enable_input_require_grads"):
            self.base_model.enable_input_require_grads()

    # ------------------------------------------------------------------ iteration helpers
    def kasa_layers(self) -> Iterator[tuple[str, KasaLayer]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, KasaLayer):
                yield name, module

    def _wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def _require_adapter(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"Unknown adapter {name!r}; this model has {sorted(self.peft_config)}.")

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self,
        adapter_name: str,
        config: KasaConfig | Any,
        calibration_batches: Iterable[Mapping[str, Any]] | None = None,
    ) -> None:
        """Add an adapter (not activated). ``config`` is a ``KasaConfig`` or a plain ``peft.LoraConfig``.

        KaSA adapters compute their truncation here (one batched float64 Gram + eigh per weight shape).
        ``calibration_batches`` (dicts of model inputs) feed the truncation guard and the activation basis; see
        :mod:`kasa_peft.truncation_guard`.
        """
        self._inject(adapter_name, config, init="compute", calibration_batches=calibration_batches)

    def _inject(
        self,
        adapter_name: str,
        config: KasaConfig | Any,
        init: str,
        calibration_batches: Iterable[Mapping[str, Any]] | None = None,
    ) -> list[str]:
        """Validate, then add the adapter to every target. ``init``: 'compute' (truncate), 'empty', or 'meta'."""
        if not isinstance(config, KasaConfig):
            config = config_from_peft_lora(config)
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another name.")
        if not adapter_name or "." in adapter_name:
            raise ValueError(f"Adapter names must be non-empty and contain no '.', got {adapter_name!r}.")
        model = self.base_model
        targets = find_target_modules(model, config)
        save_targets = find_modules_to_save(model, config.modules_to_save)
        layers = {name: model.get_submodule(name) for name in targets}
        bases = {name: (m.base_layer if isinstance(m, KasaLayer) else m) for name, m in layers.items()}
        # Every check runs before any module is replaced or any weight read into a truncation.
        minors = None
        if config.uses_truncation:
            for name, base in bases.items():
                check_truncation_rank(config.r, layer_shape(base), name=f"module {name!r}")
            if init == "compute":
                # Basis, hand-kept modules and the guard (which may record more kept modules in the config).
                # Quantised (bitsandbytes) and ZeRO-3 weights are dequantised/gathered via kasa_peft.base_layers.
                plan = plan_truncation(self, bases, config, calibration_batches)
                minors, config = plan.minors, plan.config
        kept_whole = set(config.truncation_skipped_modules or ())
        for index, (name, layer) in enumerate(layers.items()):
            base = bases[name]
            out_features, in_features = layer_shape(base)
            adapter = KasaAdapter(
                in_features,
                out_features,
                config.r,
                config.lora_alpha,
                config.lora_dropout,
                use_sigma=config.adapter_type == "kasa",
                truncate=config.uses_truncation and name not in kept_whole,
                dtype=base_layers.default_adapter_dtype(base),
                device="meta" if init == "meta" else base_layers.layer_device(base),
            )
            if minors is not None and minors[index] is not None:
                adapter.set_minor_components(minors[index])
            if not isinstance(layer, KasaLayer):
                layer = KasaLayer(base)
                parent, child = get_submodule_parent(model, name)
                setattr(parent, child, layer)
            layer.add_adapter(adapter_name, adapter)
        for name in save_targets:
            module = model.get_submodule(name)
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                parent, child = get_submodule_parent(model, name)
                setattr(parent, child, module)
            module.add_copy(adapter_name)
        self.peft_config[adapter_name] = config
        if self.active_adapter is None:
            self.active_adapter = adapter_name
        self._refresh_state()
        return targets

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one adapter used in forward (and the only trainable one)."""
        self._require_adapter(adapter_name)
        for _, layer in self.kasa_layers():
            if layer.merged_adapters:
                layer.unmerge()
        self.active_adapter = adapter_name
        self._refresh_state()

    def delete_adapter(self, adapter_name: str) -> None:
        self._require_adapter(adapter_name)
        for _, layer in self.kasa_layers():
            if adapter_name in layer.kasa_adapters:
                layer.delete_adapter(adapter_name)
        for _, wrapper in self._wrappers():
            if adapter_name in wrapper.copies:
                del wrapper.copies[adapter_name]
        del self.peft_config[adapter_name]
        self._inference_adapters.discard(adapter_name)
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)
        self._refresh_state()

    def _refresh_state(self) -> None:
        """Push the active adapter into every wrapper and make exactly its tensors trainable (unless it was loaded
        for inference)."""
        active = self.active_adapter
        trainable = active is not None and active not in self._inference_adapters
        for param in self.base_model.parameters():
            param.requires_grad_(False)
        for _, layer in self.kasa_layers():
            layer.active_adapters = [active] if active in layer.kasa_adapters else []
            if trainable and active in layer.kasa_adapters:
                for param in layer.kasa_adapters[active].parameters():
                    param.requires_grad_(True)
        for _, wrapper in self._wrappers():
            wrapper.active_adapter = active
            if trainable and active in wrapper.copies:
                for param in wrapper.copies[active].parameters():
                    param.requires_grad_(True)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter is not None else []

    @contextmanager
    def disable_adapter(self):
        """Context manager: inside it the model computes what the original model computes.

        Bit for bit while no adapter is merged; merged adapters are unmerged first, which restores the base weights
        up to the round-off of their dtype.
        """
        touched = []
        for _, module in [*self.kasa_layers(), *self._wrappers()]:
            touched.append((module, module.adapters_disabled))
            module.adapters_disabled = True
        try:
            yield
        finally:
            for module, previous in touched:
                module.adapters_disabled = previous

    # ------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active one) into the base weights; ``unmerge_adapter`` undoes it."""
        names = adapter_names or self.active_adapters
        for _, layer in self.kasa_layers():
            layer.merge([n for n in names if n in layer.kasa_adapters], safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in self.kasa_layers():
            layer.unmerge()

    def _unwrap(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        model = self.base_model
        if merge:
            self._dequantize_for_merge(dtype)
        for name, layer in list(self.kasa_layers()):
            if merge:
                pending = [n for n in (adapter_names or self.active_adapters) if n in layer.kasa_adapters]
                layer.merge([n for n in pending if n not in layer.merged_adapters], safe_merge=safe_merge)
            else:
                layer.unmerge()
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, layer.base_layer)
        for name, wrapper in list(self._wrappers()):
            keep = wrapper.copies[self.active_adapter] if merge and self.active_adapter in wrapper.copies else wrapper.original_module
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, keep)
        self.peft_config.clear()
        self._inference_adapters.clear()
        self.active_adapter = None
        return model

    def merge_and_unload(
        self, safe_merge: bool = False, adapter_names: list[str] | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """Merge the active adapter (truncation included) into the weights and return the plain base model.

        On a quantised (bitsandbytes) base, pass ``dtype`` (e.g. ``torch.bfloat16``): each targeted layer is replaced
        by a dense ``nn.Linear`` in that dtype holding ``dequant(W) + ΔW − W_minor``; untargeted layers stay quantised.
        Without ``dtype`` it refuses, since merging into packed weights would be a lossy requantisation.
        """
        return self._unwrap(merge=True, safe_merge=safe_merge, adapter_names=adapter_names, dtype=dtype)

    def _dequantize_for_merge(self, dtype: torch.dtype | None) -> None:
        quantised = [name for name, layer in self.kasa_layers() if base_layers.is_quantized(layer.base_layer)]
        if quantised and dtype is None:
            raise ValueError(
                f"The base of {quantised[0]!r} (and {len(quantised) - 1} more) is quantised; merging would requantise "
                "it and silently lose most of the update. Call merge_and_unload(dtype=torch.bfloat16) (or float32) "
                "for a dequantised merged model, or serve the adapter unmerged / via export_peft_checkpoint."
            )
        for name, layer in self.kasa_layers():
            if name in quantised:
                layer.base_layer = base_layers.dequantized_linear(layer.base_layer, dtype)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original model (its weights untouched)."""
        return self._unwrap(merge=False)

    # ------------------------------------------------------------------ training helpers
    def regularization_loss(self, adapter_name: str | None = None) -> torch.Tensor:
        """KaSA's auxiliary loss for one adapter (default: the active one); zero for plain-LoRA adapters.

        Paper form: Σ_layers β·Σσ² + γ·(‖AAᵀ−I_r‖_F + ‖BᵀB−I_r‖_F). See :mod:`kasa_peft.regularization`.
        """
        name = adapter_name or self.active_adapter
        if name is None:
            return torch.zeros(())
        self._require_adapter(name)
        config = self.peft_config[name]
        adapters = [layer.kasa_adapters[name] for _, layer in self.kasa_layers() if name in layer.kasa_adapters]
        if config.adapter_type != "kasa" or not adapters:
            device = adapters[0].lora_A.device if adapters else None
            return torch.zeros((), device=device)
        from .fsdp import whole  # FSDP2 keeps parameters sharded outside forward

        return kasa_regularization(
            [whole(a.lora_A) for a in adapters],
            [whole(a.lora_B) for a in adapters],
            [whole(a.sigma) for a in adapters],
            beta=config.beta,
            gamma=config.gamma,
            form=config.regularization_form,
        )

    def truncation_report(
        self,
        batches: Iterable[Mapping[str, Any]],
        adapter_name: str | None = None,
        per_module_loss: bool = False,
    ) -> "TruncationReport":
        """What the truncation of one adapter (default: the active one) does on calibration ``batches``.

        Per module: dropped weight energy, σ_max(W_minor)/σ_max(W), relative output change ‖W_minor X‖/‖W X‖;
        for the model: calibration loss original vs truncated (and per module alone with ``per_module_loss``).
        The model is not changed. See :mod:`kasa_peft.truncation_report`.
        """
        from .truncation_report import truncation_report

        return truncation_report(self, batches, adapter_name=adapter_name, per_module_loss=per_module_loss)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def cast_adapter(self, dtype: torch.dtype, adapter_name: str | None = None) -> None:
        """Hold one adapter's tensors (A, B, σ and the truncation buffers) in ``dtype``, e.g. the bf16 compute dtype of
        a 4-bit base. The default is float32 (float64 on float64 bases). Inputs are cast to it and outputs back to
        the base's dtype."""
        name = adapter_name or self.active_adapter
        self._require_adapter(name)
        for _, layer in self.kasa_layers():
            if name in layer.kasa_adapters:
                layer.kasa_adapters[name].to(dtype)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ persistence
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed ``<module path>.<tensor>`` (paths relative to the base model)."""
        name = adapter_name or self.active_adapter
        self._require_adapter(name)
        state: dict[str, torch.Tensor] = {}
        for path, layer in self.kasa_layers():
            if name not in layer.kasa_adapters:
                continue
            adapter = layer.kasa_adapters[name]
            for tensor_name in _ADAPTER_TENSORS:
                tensor = getattr(adapter, tensor_name)
                if tensor is not None:
                    state[f"{path}.{tensor_name}"] = tensor.detach()
        for path, wrapper in self._wrappers():
            if name in wrapper.copies:
                for key, tensor in wrapper.copies[name].state_dict().items():
                    state[f"{_MODULES_TO_SAVE_PREFIX}{path}.{key}"] = tensor.detach()
        return state

    def save_pretrained(self, save_directory: str | Path, selected_adapters: list[str] | None = None) -> None:
        """Write each adapter as ``kasa_config.json`` + ``kasa_adapter.safetensors`` (atomically, no pickle).

        The default adapter goes in ``save_directory``, others in ``save_directory/<name>`` (PEFT's layout). The
        truncation buffers are saved too, so loading needs no SVD and no access to any other checkpoint.
        """
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ValueError(f"save_pretrained needs a directory, but {save_directory} is a file.")
        for name in selected_adapters or list(self.peft_config):
            self._require_adapter(name)
            target_dir = save_directory if name == "default" else save_directory / name
            fingerprints = {
                path: base_layers.layer_fingerprint(layer.base_layer)
                for path, layer in self.kasa_layers()
                if name in layer.kasa_adapters and not layer.merged_adapters
            }
            metadata = {"format": "pt", "kasa_peft_format": checkpoint.FORMAT_VERSION, **checkpoint.encode_fingerprints(fingerprints)}
            checkpoint.save_tensors_atomic(self.adapter_state_dict(name), target_dir / checkpoint.WEIGHTS_NAME, metadata)
            # Config last: a directory with a config always has its weights beside it.
            checkpoint.atomic_write_text(target_dir / CONFIG_NAME, self.peft_config[name].to_json_string())

    def load_adapter(
        self,
        path: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        low_cpu_mem_usage: bool = False,
        check_base_weights: bool = True,
    ) -> None:
        """Add an adapter from a ``save_pretrained`` directory. Never runs an SVD and never unpickles."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            if (path / "adapter_config.json").is_file():
                from .interop import load_peft_kasa_adapter

                load_peft_kasa_adapter(self, path, adapter_name=adapter_name, is_trainable=is_trainable)
                return
            raise FileNotFoundError(
                f"No KaSA adapter at {path}: expected {CONFIG_NAME} and {checkpoint.WEIGHTS_NAME} (written by "
                "KasaModel.save_pretrained), or a PEFT adapter_config.json."
            )
        config = KasaConfig.from_json_file(path / CONFIG_NAME)
        tensors, metadata = checkpoint.load_tensors(path / checkpoint.WEIGHTS_NAME)
        targets = find_target_modules(self.base_model, config)
        saved_paths = {key.rsplit(".", 1)[0] for key in tensors if not key.startswith(_MODULES_TO_SAVE_PREFIX)}
        if saved_paths != set(targets):
            missing, extra = sorted(set(targets) - saved_paths), sorted(saved_paths - set(targets))
            raise ValueError(
                f"Checkpoint {path} does not fit this model: modules targeted here but absent from the checkpoint: "
                f"{missing[:6]}; in the checkpoint but not in this model: {extra[:6]}. Load it onto the base model it "
                "was saved from."
            )
        if check_base_weights:
            self._check_fingerprints(path, targets, checkpoint.decode_fingerprints(metadata))
        self._inject(adapter_name, config, init="meta" if low_cpu_mem_usage else "empty")
        self._load_adapter_tensors(adapter_name, tensors, assign=low_cpu_mem_usage, source=path)
        self.set_adapter_trainable(adapter_name, is_trainable)

    def set_adapter_trainable(self, adapter_name: str, trainable: bool) -> None:
        """Whether ``adapter_name``'s tensors require grad while it is active (False: loaded for inference)."""
        self._require_adapter(adapter_name)
        if trainable:
            self._inference_adapters.discard(adapter_name)
        else:
            self._inference_adapters.add(adapter_name)
        self._refresh_state()

    def _check_fingerprints(self, path: Path, targets: list[str], saved: dict[str, torch.Tensor]) -> None:
        for name in targets:
            if name not in saved:
                continue
            module = self.base_model.get_submodule(name)
            base = module.base_layer if isinstance(module, KasaLayer) else module
            if base_layers.is_on_meta(base):
                continue
            if not checkpoint.fingerprints_match(saved[name], base_layers.layer_fingerprint(base)):
                raise ValueError(
                    f"Checkpoint {path} was trained on a different base model: the weights of {name!r} do not match "
                    "the ones it was saved with. Load it onto its original base model (or pass "
                    "check_base_weights=False if you really mean to)."
                )

    def _load_adapter_tensors(
        self, adapter_name: str, tensors: dict[str, torch.Tensor], assign: bool, source: Path | str
    ) -> None:
        for path, layer in self.kasa_layers():
            if adapter_name not in layer.kasa_adapters:
                continue
            adapter = layer.kasa_adapters[adapter_name]
            prefix = f"{path}."
            sub = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix) and "." not in key[len(prefix) :]}
            expected = {k: v for k, v in adapter.state_dict().items()}
            for key, value in sub.items():
                if key not in expected:
                    raise ValueError(f"Checkpoint {source} has unexpected tensor {prefix}{key}.")
                if tuple(expected[key].shape) != tuple(value.shape):
                    raise ValueError(
                        f"Checkpoint {source} does not fit this model: {prefix}{key} has shape {tuple(value.shape)}, "
                        f"the model expects {tuple(expected[key].shape)} (different r or a different base model?)."
                    )
            missing = sorted(set(expected) - set(sub))
            if missing:
                raise ValueError(f"Checkpoint {source} lacks {[prefix + m for m in missing]}.")
            device = base_layers.layer_device(layer.base_layer)
            sub = {k: v.to(device=device, dtype=expected[k].dtype) for k, v in sub.items()}
            adapter.load_state_dict(sub, strict=True, assign=assign)
        for path, wrapper in self._wrappers():
            if adapter_name not in wrapper.copies:
                continue
            prefix = f"{_MODULES_TO_SAVE_PREFIX}{path}."
            sub = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
            wrapper.copies[adapter_name].load_state_dict(sub, strict=True)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        low_cpu_mem_usage: bool = False,
        check_base_weights: bool = True,
    ) -> "KasaModel":
        """Wrap ``model`` with the adapter saved at ``path`` (ours, or a PEFT KaSA/LoRA checkpoint).

        ``is_trainable=False`` (default) loads for inference: no parameter requires grad.
        ``low_cpu_mem_usage=True`` creates the adapter tensors on the meta device and assigns the loaded ones.
        """
        kasa_model = cls(model, None)
        kasa_model.load_adapter(
            path,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            low_cpu_mem_usage=low_cpu_mem_usage,
            check_base_weights=check_base_weights,
        )
        kasa_model.set_adapter(adapter_name)
        return kasa_model


def get_kasa_model(
    model: nn.Module,
    config: KasaConfig,
    adapter_name: str = "default",
    calibration_batches: Iterable[Mapping[str, Any]] | None = None,
) -> KasaModel:
    """Wrap ``model`` with a new, trainable KaSA adapter (the counterpart of ``peft.get_peft_model``).

    ``calibration_batches``: dicts of model inputs (e.g. ``[tokenizer(text, return_tensors="pt")]``) on which
    ``config.truncation_guard`` measures the truncation's effect, and from which ``truncation_basis='activation'``
    takes its input statistics.
    """
    return KasaModel(model, config, adapter_name=adapter_name, calibration_batches=calibration_batches)
