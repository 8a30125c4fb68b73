"""``LoRALayer``: what every LoRA layer type shares (setup, load hooks, forward, merge).

The concrete types (``layers.py``, ``layers_mha.py``) supply the shapes, ``B(A x)`` and
``B·A`` in their base weight's layout; the merge formula ``W + scale·B·A`` and DoRA's
per-output norm are written here once.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTER_PARAM_NAMES = ("lora_A", "lora_B", "lora_magnitude")


def _row_norm(w: Tensor) -> Tensor:
    """DoRA's norm: the L2 norm of each output's row of an out-first weight."""
    return w.flatten(1).norm(p=2, dim=1)


class LoRALayer:
    """Mixin shared by every LoRA layer type. Never instantiated directly.

    Attributes set at injection: ``r``, ``alpha``, ``scaling``, ``lora_dropout_p``,
    ``use_dora``, ``merged`` and ``lora_disabled``.
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    weight: nn.Parameter
    bias: nn.Parameter | None
    _lora_base_class: type[nn.Module]

    # -- construction ---------------------------------------------------------------
    def _lora_setup(
        self, r: int, alpha: float, scaling: float, dropout: float, init: str, use_dora: bool
    ) -> None:
        self.r = r
        self.alpha = alpha
        self.scaling = scaling
        self.lora_dropout_p = dropout
        self.use_dora = use_dora
        self.merged = False
        self.lora_disabled = False
        self._dora_merge_norm: Tensor | None = None
        self._lora_absent_keys: list[str] = []
        w = self.weight
        a_shape, b_shape = self._lora_shapes(r)
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(b_shape, dtype=w.dtype, device=w.device))
        self._lora_init_weights(init)
        if use_dora:
            with torch.no_grad():
                norm = self._dora_weight_norm()
            # In the weight's dtype: a float32 magnitude would promote a bf16 layer's output.
            self.lora_magnitude = nn.Parameter(
                norm.reshape(self._magnitude_shape()).to(w.dtype, copy=True)
            )
        self._lora_hooks = (
            self.register_load_state_dict_pre_hook(self._lora_pre_load_hook),
            self.register_load_state_dict_post_hook(self._lora_post_load_hook),
        )

    def _lora_init_weights(self, init: str) -> None:
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _lora_teardown(self) -> None:
        """Remove the adapter's parameters and hooks (the class swap is the caller's)."""
        for handle in self._lora_hooks:
            handle.remove()
        for name in self.adapter_param_names():
            delattr(self, name)
        for attr in ("r", "alpha", "scaling", "lora_dropout_p", "use_dora", "merged",
                     "lora_disabled", "_dora_merge_norm", "_lora_absent_keys", "_lora_hooks"):
            self.__dict__.pop(attr, None)

    @property
    def lora_alpha(self) -> float:
        """Deprecated spelling of ``alpha`` (the name ``LoRAConfig`` uses)."""
        warnings.warn("LoRALayer.lora_alpha is deprecated; use .alpha (as in LoRAConfig).",
                      DeprecationWarning, stacklevel=2)
        return self.alpha

    def adapter_param_names(self) -> tuple[str, ...]:
        """Local names of this layer's adapter parameters."""
        return ADAPTER_PARAM_NAMES if self.use_dora else ADAPTER_PARAM_NAMES[:2]

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

    def _lora_out(self, x: Tensor) -> Tensor:
        """B(A(x)), unscaled, in the layout of the base output."""
        raise NotImplementedError

    def _delta_native(self) -> Tensor:
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

    # -- the update, written once -----------------------------------------------------
    def _combined(self) -> Tensor:
        """W + scale·ΔW with the output dimension first, in float32: the merge formula."""
        return self._out_first(self.weight).float() + self.scaling * self._out_first(
            self._delta_native()
        )

    def _merged_values(self) -> tuple[Tensor, Tensor | None]:
        """What ``weight`` holds once merged (out-first, float32), and DoRA's norm."""
        new = self._combined()
        if not self.use_dora:
            return new, None
        norm = _row_norm(new)
        return new * self._dora_factor(norm), norm

    # -- DoRA ------------------------------------------------------------------------
    def _dora_weight_norm(self) -> Tensor:
        """Per-output L2 norm of W + scale·ΔW, computed in float32, shape (out,)."""
        return _row_norm(self._combined())

    def _dora_factor(self, norm: Tensor) -> Tensor:
        """m / ‖W + ΔW‖ shaped to broadcast over the out-first weight, float32."""
        w_of = self._out_first(self.weight)
        factor = self.lora_magnitude.reshape(-1).float() / norm
        return factor.reshape((-1,) + (1,) * (w_of.dim() - 1))

    # -- forward ---------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        base = self._lora_base_class.forward
        if self.merged or self.lora_disabled:
            return base(self, x, *args, **kwargs)
        result = base(self, x, *args, **kwargs)
        xd = x
        if self.lora_dropout_p > 0.0 and self.training:
            xd = F.dropout(x, self.lora_dropout_p, training=True)
        lora = self._lora_out(xd)
        if not self.use_dora:
            if x.is_nested:  # torch's TransformerEncoder passes nested tensors
                return result + lora * self.scaling
            # In place: the base op's backward never needs its own output, and this
            # saves one output-sized temporary per adapted layer.
            return result.add_(lora, alpha=self.scaling)
        m = self.lora_magnitude
        scale = m / self._dora_weight_norm().detach().to(m.dtype).view_as(m)
        if xd is x:
            base_d = result if self.bias is None else result - self._bias_view()
        else:
            base_d = self._base_nobias(xd)
        return result + (scale - 1) * base_d + scale * (self.scaling * lora)

    # -- merge / unmerge -------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` (in float32, cast once). No-op if merged."""
        if self.merged:
            return
        w = self.weight
        new, self._dora_merge_norm = self._merged_values()
        self._out_first(w).copy_(new.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from ``weight`` again. No-op if not merged."""
        if not self.merged:
            return
        w = self.weight
        cur = self._out_first(w).float()
        if self.use_dora:
            cur = cur / self._dora_factor(self._dora_merge_norm)
            self._dora_merge_norm = None
        cur = cur - self.scaling * self._out_first(self._delta_native())
        self._out_first(w).copy_(cur.to(w.dtype))
        self.merged = False

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The weight an un-injected module needs to compute this layer's output."""
        w = self.weight
        if self.merged:
            return w.detach().clone()
        out = torch.empty_like(w)
        self._out_first(out).copy_(self._merged_values()[0].to(w.dtype))
        return out

    def extra_repr(self) -> str:
        base = self._lora_base_class.extra_repr(self)
        return (f"{base}, lora_r={self.r}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:g}, dora={self.use_dora}, merged={self.merged}")
