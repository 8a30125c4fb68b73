"""LoRA layer types: forward, merge and unmerge for each supported base module.

A frozen weight ``W`` gets a trainable low-rank update::

            x ──────────────► W ──────────────┐
            │                                 ▼
            └─► dropout ─► A (r×k) ─► B (d×r) ─► ×scale ─► (+) ─► y

    y = W x + scale · B(A x)      scale = alpha / r   (or alpha / √r with rsLoRA)

``B`` starts at zero, so an injected model computes exactly what the base model did.

A LoRA layer *is* its base module: injection swaps the instance's class to a subclass
(``LoRALinear`` is an ``nn.Linear``), so ``weight`` and ``bias`` keep their names and a
plain base state dict loads with no renaming. The only new state-dict keys are the
adapter's: ``lora_A``, ``lora_B`` and, with DoRA, ``lora_magnitude``.

Tensor layouts follow PEFT's on-disk shapes so that adapter files translate by name only:

=============  ==================  ==================  =====================
base           lora_A              lora_B              ΔW (native layout)
=============  ==================  ==================  =====================
Linear         (r, in)             (out, r)            B @ A
ConvNd         (r, in, *kernel)    (out, r, 1, ...)    B ⊗ A over r
Embedding      (r, num)            (dim, r)            (B @ A)ᵀ
HF Conv1D      (r, in)             (out, r)            (B @ A)ᵀ
=============  ==================  ==================  =====================

Merging is explicit (``merge``/``unmerge``); it never happens on ``train()``/``eval()``,
because Lightning flips ``.training`` directly and would bypass such a hook.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTER_PARAM_NAMES = ("lora_A", "lora_B", "lora_magnitude")


class LoRALayer:
    """Mixin shared by every LoRA layer type. Never instantiated directly.

    Attributes set at injection: ``r``, ``lora_alpha``, ``scaling``, ``lora_dropout_p``,
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
        self.lora_alpha = alpha
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
        for attr in ("r", "lora_alpha", "scaling", "lora_dropout_p", "use_dora", "merged",
                     "lora_disabled", "_dora_merge_norm", "_lora_absent_keys", "_lora_hooks"):
            self.__dict__.pop(attr, None)

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

    # -- DoRA ------------------------------------------------------------------------
    def _dora_weight_norm(self) -> Tensor:
        """Per-output L2 norm of W + scale·ΔW, computed in float32, shape (out,)."""
        w = self._out_first(self.weight).float() + self.scaling * self._out_first(
            self._delta_native()
        )
        return w.flatten(1).norm(p=2, dim=1)

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
        new = self._out_first(w).float() + self.scaling * self._out_first(self._delta_native())
        if self.use_dora:
            norm = new.flatten(1).norm(p=2, dim=1)
            self._dora_merge_norm = norm
            new = new * self._dora_factor(norm)
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
        new = self._out_first(w).float() + self.scaling * self._out_first(self._delta_native())
        if self.use_dora:
            new = new * self._dora_factor(new.flatten(1).norm(p=2, dim=1))
        out = torch.empty_like(w)
        self._out_first(out).copy_(new.to(w.dtype))
        return out

    def extra_repr(self) -> str:
        base = self._lora_base_class.extra_repr(self)
        return (f"{base}, lora_r={self.r}, lora_alpha={self.lora_alpha:g}, "
                f"scaling={self.scaling:g}, dora={self.use_dora}, merged={self.merged}")


class _MatmulLoRA(LoRALayer):
    """Fused forward for layers whose base op is a matmul (Linear, HF Conv1D).

    The input is flattened to 2-D so the base op returns a fresh tensor, not a view, and the
    adapter's update is added with one in-place ``addmm_``. An in-place add on the 3-D view
    that ``F.linear`` returns made autograd copy the output in backward (measured in
    ``benchmarks/``); this path does not.
    """

    out_dim: int

    def _base_2d(self, x2: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.merged or self.lora_disabled or self.use_dora:
            return LoRALayer.forward(self, x, *args, **kwargs)
        x2 = x.reshape(-1, x.shape[-1])
        out = self._base_2d(x2)
        xd = x2
        if self.lora_dropout_p > 0.0 and self.training:
            xd = F.dropout(x2, self.lora_dropout_p, training=True)
        # In-place ops skip autocast, so match the base output's dtype by hand (a no-op
        # outside autocast).
        a = F.linear(xd, self.lora_A).to(out.dtype)
        out = out.addmm_(a, self.lora_B.t().to(out.dtype), alpha=self.scaling)
        return out.view(*x.shape[:-1], out.shape[-1])


class LoRALinear(_MatmulLoRA, nn.Linear):
    """LoRA on ``nn.Linear``."""

    _lora_base_class = nn.Linear

    def _base_2d(self, x2):
        return F.linear(x2, self.weight, self.bias)

    def _lora_shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def _lora_out(self, x):
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def _delta_native(self):
        return self.lora_B.float() @ self.lora_A.float()

    def _base_nobias(self, x):
        return F.linear(x, self.weight)


class _LoRAConvNd(LoRALayer):
    _conv_fn: Any

    def _lora_shapes(self, r):
        k = tuple(self.kernel_size)
        return (r, self.in_channels, *k), (self.out_channels, r, *([1] * len(k)))

    def _lora_out(self, x):
        # A uses the base's stride, padding, dilation and padding mode; B is a 1×1 conv.
        return self._conv_fn(self._conv_forward(x, self.lora_A, None), self.lora_B)

    def _delta_native(self):
        b = self.lora_B.float().flatten(1)  # (out, r)
        a = self.lora_A.float()
        return (b @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])

    def _base_nobias(self, x):
        return self._conv_forward(x, self.weight, None)

    def _bias_view(self):
        return self.bias.view(1, -1, *([1] * (self.weight.dim() - 2)))

    def _magnitude_shape(self):
        return (1, self.out_channels, *([1] * (self.weight.dim() - 2)))


class LoRAConv1d(_LoRAConvNd, nn.Conv1d):
    """LoRA on ``nn.Conv1d`` (groups = 1, any kernel size)."""

    _lora_base_class = nn.Conv1d
    _conv_fn = staticmethod(F.conv1d)


class LoRAConv2d(_LoRAConvNd, nn.Conv2d):
    """LoRA on ``nn.Conv2d`` (groups = 1, any kernel size)."""

    _lora_base_class = nn.Conv2d
    _conv_fn = staticmethod(F.conv2d)


class LoRAEmbedding(LoRALayer, nn.Embedding):
    """LoRA on ``nn.Embedding``. As in PEFT, A starts at zero and B is random."""

    _lora_base_class = nn.Embedding

    def _lora_shapes(self, r):
        return (r, self.num_embeddings), (self.embedding_dim, r)

    def _lora_init_weights(self, init):
        with torch.no_grad():
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B, std=1.0 / self.r if init == "gaussian" else 1.0)

    def _lora_out(self, x):
        # Dropout never applies to token indices (x is x here: dropout skips ints below).
        return F.embedding(x, self.lora_A.T, padding_idx=self.padding_idx) @ self.lora_B.T

    def forward(self, x, *args, **kwargs):
        if self.merged or self.lora_disabled:
            return nn.Embedding.forward(self, x)
        return nn.Embedding.forward(self, x).add_(self._lora_out(x), alpha=self.scaling)

    def _delta_native(self):
        return (self.lora_B.float() @ self.lora_A.float()).T

    def _out_first(self, w):
        return w.T


class _LoRAConv1DMixin(_MatmulLoRA):
    """LoRA on HF ``transformers`` ``Conv1D`` (GPT-2 style: weight is (in, out))."""

    def _base_2d(self, x2):
        if self.bias is None:
            return x2 @ self.weight
        return torch.addmm(self.bias, x2, self.weight)

    def _lora_shapes(self, r):
        return (r, self.nx), (self.nf, r)

    def _lora_out(self, x):
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def _delta_native(self):
        return (self.lora_B.float() @ self.lora_A.float()).T

    def _base_nobias(self, x):
        return x @ self.weight

    def _out_first(self, w):
        return w.T


_BUILTIN = {
    nn.Linear: LoRALinear,
    nn.Conv1d: LoRAConv1d,
    nn.Conv2d: LoRAConv2d,
    nn.Embedding: LoRAEmbedding,
}
_LAZY: dict[type, type] = {}


def _hf_conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional
        return None
    return Conv1D


def _make_hf_conv1d_lora(base: type) -> type:
    if base not in _LAZY:
        cls = type("LoRAConv1D", (_LoRAConv1DMixin, base), {"_lora_base_class": base})
        cls.__module__ = __name__
        cls.__qualname__ = "LoRAConv1D"
        _LAZY[base] = cls
        globals()["LoRAConv1D"] = cls  # importable by name, so pickling works
    return _LAZY[base]


def lora_class_for(module: nn.Module) -> type | None:
    """The LoRA class for ``module``'s exact type, or None if the type is unsupported."""
    t = type(module)
    if t in _BUILTIN:
        return _BUILTIN[t]
    if t.__name__ == "Conv1D" and t.__module__.startswith("transformers"):
        return _make_hf_conv1d_lora(t)
    return None


def supported_type_names() -> list[str]:
    return ["nn.Linear", "nn.Conv1d", "nn.Conv2d", "nn.Embedding", "transformers Conv1D"]


def is_linear_like(module: nn.Module) -> bool:
    """True for the types that ``"all-linear"`` targets: nn.Linear and HF Conv1D (also
    once adapted, so that injecting again finds the modules it adapted before)."""
    t = module._lora_base_class if isinstance(module, LoRALayer) else type(module)
    return t is nn.Linear or (t.__name__ == "Conv1D" and t.__module__.startswith("transformers"))


def __getattr__(name: str) -> Any:
    # ``LoRAConv1D`` exists only once transformers is importable; build it on demand so
    # that unpickling a model in a fresh process finds the class.
    if name == "LoRAConv1D":
        base = _hf_conv1d_class()
        if base is not None:
            return _make_hf_conv1d_lora(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
