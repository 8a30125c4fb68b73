"""``LoRALayer``: what every LoRA layer type shares (adapters, load hooks, forward, merge).

The concrete types (``layers.py``, ``layers_mha.py``) supply the shapes, ``B(A x)`` and
``B·A`` in their base weight's layout; the merge formula ``W + Σ scale·B·A`` and DoRA's
per-output norm are written here once.

A layer holds one or more named adapters, each with its own rank, alpha, dropout and DoRA
flag (:class:`AdapterSpec`). The adapter named ``"default"`` keeps the historical
parameter names ``lora_A``, ``lora_B`` and ``lora_magnitude``, so every checkpoint and
adapter file of a single-adapter model still loads; another adapter ``x`` uses
``lora_A_x``, ``lora_B_x`` and ``lora_magnitude_x``. ``lora_active`` lists the adapters
the forward applies (switching is a list assignment: no weight is copied), and
``lora_groups``, when set, applies a different adapter to each group of samples of one
batch.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer_merge import MergeMixin

ADAPTER_PARAM_NAMES = ("lora_A", "lora_B", "lora_magnitude")
DEFAULT_ADAPTER = "default"
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")
"""Adapter names: letters, digits and underscores (they become parameter-name suffixes)."""


def param_names(adapter: str) -> tuple[str, str, str]:
    """Attribute names of ``adapter``'s A, B and DoRA magnitude on a layer."""
    if adapter == DEFAULT_ADAPTER:
        return ADAPTER_PARAM_NAMES
    return tuple(f"{n}_{adapter}" for n in ADAPTER_PARAM_NAMES)  # type: ignore[return-value]


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's settings on one layer."""

    r: int
    alpha: float
    scaling: float
    dropout: float
    use_dora: bool


class LoRALayer(MergeMixin):
    """Mixin shared by every LoRA layer type. Never instantiated directly.

    Set at injection: ``lora_specs`` (adapter name -> :class:`AdapterSpec`),
    ``lora_active`` (names the forward applies), ``merged_adapters`` (names folded into
    the weight), ``lora_disabled`` and ``lora_groups`` (per-sample adapters, or ``None``).
    ``r``, ``alpha``, ``scaling``, ``lora_dropout_p`` and ``use_dora`` read the settings of
    the first active adapter (the only one, in a single-adapter model).
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    weight: nn.Parameter
    bias: nn.Parameter | None
    _lora_base_class: type[nn.Module]

    # -- construction ---------------------------------------------------------------
    def _lora_setup(self) -> None:
        """Turn the swapped-in module into a LoRA layer with no adapter yet."""
        self.lora_specs: dict[str, AdapterSpec] = {}
        self.lora_active: list[str] = []
        self.merged_adapters: list[str] = []
        self.lora_disabled = False
        self.lora_groups: list[tuple[str, Tensor]] | None = None
        self._dora_merge_norm: Tensor | None = None
        self._lora_absent_keys: list[str] = []
        self._lora_hooks = (
            self.register_load_state_dict_pre_hook(self._lora_pre_load_hook),
            self.register_load_state_dict_post_hook(self._lora_post_load_hook),
        )

    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout: float,
                    init: str, use_dora: bool) -> None:
        """Add adapter ``name`` (B = 0, so the output is unchanged). Refused while merged."""
        if self.merged_adapters:
            raise RuntimeError(f"cannot add adapter {name!r} to a merged layer; unmerge first.")
        w = self.weight
        a_name, b_name, m_name = param_names(name)
        a_shape, b_shape = self._lora_shapes(r)
        a = nn.Parameter(torch.empty(a_shape, dtype=w.dtype, device=w.device))
        b = nn.Parameter(torch.empty(b_shape, dtype=w.dtype, device=w.device))
        self._lora_init_weights(init, a, b, r)
        setattr(self, a_name, a)
        setattr(self, b_name, b)
        self.lora_specs[name] = AdapterSpec(r, alpha, scaling, dropout, use_dora)
        if use_dora:
            with torch.no_grad():
                norm = self._dora_weight_norm(name)
            # In the weight's dtype: a float32 magnitude would promote a bf16 layer's output.
            setattr(self, m_name, nn.Parameter(
                norm.reshape(self._magnitude_shape()).to(w.dtype, copy=True)))

    def remove_adapter(self, name: str) -> None:
        """Delete adapter ``name`` and its parameters (the layer must not be merged)."""
        if self.merged_adapters:
            raise RuntimeError(f"cannot remove adapter {name!r} from a merged layer; unmerge "
                               "first.")
        for attr in self.adapter_param_names(name):
            delattr(self, attr)
        del self.lora_specs[name]
        self.lora_active = [n for n in self.lora_active if n != name]

    def _lora_init_weights(self, init: str, a: Tensor, b: Tensor, r: int) -> None:
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def _lora_teardown(self) -> None:
        """Remove every adapter's parameters and the hooks (the class swap is the caller's)."""
        for handle in self._lora_hooks:
            handle.remove()
        for name in list(self.lora_specs):
            for attr in self.adapter_param_names(name):
                delattr(self, attr)
        for attr in ("lora_specs", "lora_active", "merged_adapters", "lora_disabled",
                     "lora_groups", "_dora_merge_norm", "_lora_absent_keys", "_lora_hooks",
                     "_lora_owner_registry"):
            self.__dict__.pop(attr, None)

    def adapter_param_names(self, adapter: str | None = None) -> tuple[str, ...]:
        """Local names of one adapter's parameters (of every adapter when ``None``)."""
        names = list(self.lora_specs) if adapter is None else [adapter]
        out: list[str] = []
        for n in names:
            a, b, m = param_names(n)
            out += [a, b, m] if self.lora_specs[n].use_dora else [a, b]
        return tuple(out)

    def _ab(self, name: str) -> tuple[Tensor, Tensor]:
        a, b, _ = param_names(name)
        return getattr(self, a), getattr(self, b)

    def _magnitude(self, name: str) -> Tensor:
        return getattr(self, param_names(name)[2])

    # -- the settings of the first active adapter (single-adapter compatibility) --------
    def _primary(self) -> AdapterSpec:
        for n in self.lora_active:
            if n in self.lora_specs:
                return self.lora_specs[n]
        return next(iter(self.lora_specs.values()))

    r = property(lambda self: self._primary().r)
    alpha = property(lambda self: self._primary().alpha)
    scaling = property(lambda self: self._primary().scaling)
    lora_dropout_p = property(lambda self: self._primary().dropout)
    use_dora = property(lambda self: self._primary().use_dora)
    merged = property(lambda self: bool(self.merged_adapters))

    @property
    def lora_alpha(self) -> float:
        """Deprecated spelling of ``alpha`` (the name ``LoRAConfig`` uses)."""
        warnings.warn("LoRALayer.lora_alpha is deprecated; use .alpha (as in LoRAConfig).",
                      DeprecationWarning, stacklevel=2)
        return self.alpha

    def _pending(self) -> list[str]:
        """Active adapters the forward must still add (not merged, not disabled)."""
        if self.lora_disabled:
            return []
        return [n for n in self.lora_active if n in self.lora_specs
                and n not in self.merged_adapters]

    # -- key reconciliation: only this layer's own adapter keys may be missing -------
    def _lora_pre_load_hook(self, module, state_dict, prefix, *args: Any) -> None:
        self._lora_absent_keys = [
            prefix + n for n in self.adapter_param_names() if prefix + n not in state_dict
        ]

    def _lora_post_load_hook(self, module, incompatible_keys) -> None:
        missing = incompatible_keys.missing_keys
        for key in self._lora_absent_keys:
            while key in missing:
                missing.remove(key)
        self._lora_absent_keys = []

    # -- per-type pieces (overridden) -----------------------------------------------
    def _lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def _lora_out(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """B(A(x)), unscaled, in the layout of the base output."""
        raise NotImplementedError

    def _delta_native(self, a: Tensor, b: Tensor) -> Tensor:
        """B·A in the base weight's layout, unscaled, in float32."""
        raise NotImplementedError

    def _base_nobias(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"DoRA is not supported for {type(self).__name__}")

    def _out_first(self, w: Tensor) -> Tensor:
        """View a weight-shaped tensor with the output dimension first."""
        return w

    def _bias_view(self) -> Tensor:
        return self.bias

    def _magnitude_shape(self) -> tuple[int, ...]:
        return (self._out_first(self.weight).shape[0],)

    # -- forward ---------------------------------------------------------------------
    def _dropped(self, x: Tensor, spec: AdapterSpec) -> Tensor:
        """The adapter's input: ``x`` with its LoRA dropout in train mode (never on token
        indices), or ``x`` itself."""
        if spec.dropout > 0.0 and self.training and x.is_floating_point():
            return F.dropout(x, spec.dropout, training=True)
        return x

    def _delta(self, x: Tensor, base_out: Tensor, name: str) -> Tensor:
        """What adapter ``name`` adds to the base output ``base_out`` of input ``x``."""
        spec = self.lora_specs[name]
        a, b = self._ab(name)
        xd = self._dropped(x, spec)
        lora = self._lora_out(xd, a, b)
        if not spec.use_dora:
            return lora * spec.scaling
        m = self._magnitude(name)
        scale = m / self._dora_weight_norm(name).detach().to(m.dtype).view_as(m)
        if xd is x:
            base_d = base_out if self.bias is None else base_out - self._bias_view()
        else:
            base_d = self._base_nobias(xd)
        return (scale - 1) * base_d + scale * (spec.scaling * lora)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self._lora_base_class.forward(self, x, *args, **kwargs)
        if self.lora_groups is not None:
            return self._mixed(x, result)
        names = self._pending()
        if len(names) == 1 and not self.lora_specs[names[0]].use_dora and not x.is_nested:
            # In place: the base op's backward never needs its own output, and this
            # saves one output-sized temporary per adapted layer.
            spec = self.lora_specs[names[0]]
            a, b = self._ab(names[0])
            return result.add_(self._lora_out(self._dropped(x, spec), a, b), alpha=spec.scaling)
        out = result
        for n in names:  # several adapters: each sees the pure base output (DoRA needs it)
            out = out + self._delta(x, result, n)
        return out

    def _mixed(self, x: Tensor, result: Tensor) -> Tensor:
        """Each group of samples (batch dimension 0) gets its own adapter; samples in no
        group get exactly the base output."""
        if self.merged_adapters:
            raise RuntimeError("per-sample adapters need unmerged layers; call unmerge_lora "
                               "first.")
        if self.lora_disabled:
            return result
        out = result
        for name, idx in self.lora_groups:
            if name not in self.lora_specs:
                continue  # this layer carries no such adapter: base output for those samples
            xs, rs = x.index_select(0, idx), result.index_select(0, idx)
            out = out.index_add(0, idx, self._delta(xs, rs, name).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        base = self._lora_base_class.extra_repr(self)
        adapters = ", ".join(f"{n}(r={s.r}, alpha={s.alpha:g}, scaling={s.scaling:g}"
                             f"{', dora' if s.use_dora else ''})"
                             for n, s in self.lora_specs.items())
        return (f"{base}, adapters=[{adapters}], active={self.lora_active}, "
                f"merged={self.merged_adapters}")
