"""Layer plumbing: a KaSA adapter's tensors, and the wrapper that adds adapters to a frozen Linear/Conv1D.

The frozen base weight ``W`` is never written to (except by an explicit ``merge``). KaSA's truncation is applied as a
rank-r correction in the forward pass instead, so one layer can carry several adapters — KaSA with different ranks,
plain LoRA — and disabling unmerged adapters gives the original layer bit for bit (after a merge, disabling unmerges,
which restores the weight up to the round-off of its dtype)::

    y = base(x) − minor_u_sigma · (minor_vh · x) + (α/r) · B · (σ ⊙ (A · dropout(x)))
      = (W − U_r Σ_r V_rᵀ) x + ΔW x,        ΔW = (α/r) · B · diag(σ) · A
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import base_layers
from .spectral import MinorComponents

__all__ = ["KasaAdapter", "KasaLayer", "ModulesToSaveWrapper"]

class KasaAdapter(nn.Module):
    """One adapter's tensors for one layer.

    Parameters: ``lora_A`` (r × in, Kaiming-uniform), ``lora_B`` (out × r, zeros), ``sigma`` (r, N(0, 1); KaSA only).
    Buffers (KaSA with truncation only): ``minor_u_sigma`` = U_r Σ_r (out × r), ``minor_vh`` = V_rᵀ (r × in).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        *,
        use_sigma: bool = True,
        truncate: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.r = r
        self.scaling = float(lora_alpha) / r
        self.truncate = truncate
        factory = {"dtype": dtype, "device": device}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.sigma = nn.Parameter(torch.empty(r, **factory)) if use_sigma else None
        if truncate:
            self.register_buffer("minor_u_sigma", torch.zeros(out_features, r, **factory))
            self.register_buffer("minor_vh", torch.zeros(r, in_features, **factory))
        else:
            self.minor_u_sigma = None
            self.minor_vh = None
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        if torch.device(device or "cpu").type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as LoRA (and the KaSA authors): A Kaiming-uniform, B zero so ΔW = 0 at step 0; σ ~ N(0, 1).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.sigma is not None:
            nn.init.normal_(self.sigma)

    def set_minor_components(self, minor: MinorComponents) -> None:
        if not self.truncate:
            raise RuntimeError("This adapter does not truncate; it has no minor components to set.")
        with torch.no_grad():
            self.minor_u_sigma.copy_(minor.minor_u_sigma)
            self.minor_vh.copy_(minor.minor_vh)

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A.dtype

    def update_scale(self) -> torch.Tensor | float:
        """The r-vector (α/r)·σ that sits between A and B (plain LoRA: the scalar α/r)."""
        return self.sigma * self.scaling if self.sigma is not None else self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``ΔW − W_minor`` as an (out × in) matrix: what a merge adds to the base weight."""
        delta = (self.lora_B * self.update_scale()) @ self.lora_A
        if self.truncate:
            delta = delta - self.minor_u_sigma @ self.minor_vh
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The additive output for input ``x`` (…, in): ``ΔW·dropout(x) − W_minor·x``, shape (…, out)."""
        x = x.to(self.lora_A.dtype)
        if self.truncate and self.sigma is not None and isinstance(self.dropout, nn.Identity):
            # Without dropout both terms read the same x, so they fuse into one rank-2r product
            # [B, U_rΣ_r] · diag([(α/r)σ, −1]) · [A; V_rᵀ] x: two matmuls instead of four (≈ LoRA's cost).
            down = torch.cat([self.lora_A, self.minor_vh])
            up = torch.cat([self.lora_B, self.minor_u_sigma], dim=1)
            coefficients = torch.cat([self.sigma * self.scaling, torch.full_like(self.sigma, -1.0)])
            return F.linear(F.linear(x, down) * coefficients, up)
        # σ scales the r-dim intermediate elementwise: no diag(σ) matrix is ever built.
        output = F.linear(F.linear(self.dropout(x), self.lora_A) * self.update_scale(), self.lora_B)
        if self.truncate:
            output = output - F.linear(F.linear(x, self.minor_vh), self.minor_u_sigma)
        return output

    def extra_repr(self) -> str:
        kind = "kasa" if self.sigma is not None else "lora"
        return f"kind={kind}, r={self.r}, scaling={self.scaling:g}, truncate={self.truncate}"


class KasaLayer(nn.Module):
    """Wraps a frozen base layer (``base_layer``: Linear, Conv1D or a bitsandbytes 4/8-bit Linear, see
    :mod:`kasa_peft.base_layers`) and adds the active adapters' outputs."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        base_layers.require_supported(base_layer, type(base_layer).__name__)
        self.base_layer = base_layer
        self.kasa_adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        self.out_features, self.in_features = base_layers.layer_shape(base_layer)

    # Code in transformers and accelerate reads `.weight` / `.bias` off linear layers (dtype checks, tying).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_weight_matrix(self) -> torch.Tensor:
        return base_layers.weight_matrix(self.base_layer)

    def add_adapter(self, name: str, adapter: KasaAdapter) -> None:
        if name in self.kasa_adapters:
            raise ValueError(f"Adapter {name!r} already exists on this layer.")
        self.kasa_adapters[name] = adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge(names=[name])
        del self.kasa_adapters[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.adapters_disabled and self.merged_adapters:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.adapters_disabled:
            return result
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            result = result + self.kasa_adapters[name](x).to(result.dtype)
        return result

    def _shifted_weight(self, delta: torch.Tensor, sign: float) -> torch.Tensor:
        """``W + sign·delta`` in the weight's own layout and dtype, rounded once from a float32 (or wider) sum."""
        return base_layers.weight_plus(self.base_layer, sign * delta)

    def _write_weight(self, value: torch.Tensor) -> None:
        base_layers.write_weight(self.base_layer, value)  # in place: tied or shared weights stay tied

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold ``ΔW − W_minor`` of each named (default: active) adapter into the base weight.

        ``safe_merge`` checks the merged weight *in the weight's dtype* before writing it: a float32 sum can be
        finite and still overflow to Inf once rounded to float16.
        """
        for name in names if names is not None else list(self.active_adapters):
            if not base_layers.can_merge_into(self.base_layer):
                raise ValueError(
                    f"Cannot merge adapter {name!r} into a quantised {type(self.base_layer).__name__}: that would "
                    "requantise the base and silently lose the update. Use merge_and_unload(dtype=torch.bfloat16) "
                    "for a dequantised merged model, or keep the adapter unmerged (or export it as LoRA)."
                )
            if name in self.merged_adapters:
                warnings.warn(f"Adapter {name!r} is already merged; skipping.", stacklevel=3)
                continue
            merged = self._shifted_weight(self.kasa_adapters[name].delta_weight(), +1.0)
            if safe_merge and not bool(torch.isfinite(merged).all()):
                raise ValueError(
                    f"NaNs or Infs detected while merging adapter {name!r} into a {self.base_layer.weight.dtype} "
                    "weight; the weight was not changed."
                )
            self._write_weight(merged)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtract merged adapters again (restores the original weight up to round-off of the weight's dtype)."""
        for name in list(reversed(self.merged_adapters)) if names is None else names:
            if name not in self.merged_adapters:
                continue
            self._write_weight(self._shifted_weight(self.kasa_adapters[name].delta_weight(), -1.0))
            self.merged_adapters.remove(name)


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and gives each adapter its own trainable copy (e.g. a classifier head)."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.adapters_disabled = False

    def add_copy(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original_module)

    def forward(self, *args, **kwargs):
        if self.adapters_disabled or self.active_adapter not in self.copies:
            return self.original_module(*args, **kwargs)
        return self.copies[self.active_adapter](*args, **kwargs)

    # transformers reaches into heads for attributes such as `.weight` or `.out_proj`; serve them from the copy in use.
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__["_modules"]
            active = self.__dict__.get("active_adapter")
            target = modules["copies"][active] if active in modules["copies"] else modules["original_module"]
            return getattr(target, name)
