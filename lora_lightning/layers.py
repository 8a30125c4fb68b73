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

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer_base import ADAPTER_PARAM_NAMES, LoRALayer

__all__ = ["ADAPTER_PARAM_NAMES", "LoRALayer", "LoRALinear", "LoRAConv1d", "LoRAConv2d",
           "LoRAEmbedding", "lora_type_for", "hf_conv1d_type"]


_FOLD_ROWS = 64
"""Rows from which an unmerged forward without autograd folds the update into the weight."""


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

    def _mixed_folded(self, x: Tensor) -> Tensor:
        """A mixed batch without autograd: each group of samples goes through its own
        folded weight W + scale·B·A, the others through W; one matmul per group."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        covered = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        out = None
        for name, idx in self.lora_groups:
            y = F.linear(x.index_select(0, idx), self._combined([name]).to(x.dtype), bias)
            out = x.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
            out.index_copy_(0, idx, y)
            covered[idx] = True
        rest = (~covered).nonzero().squeeze(1)
        if rest.numel():
            y = self._lora_base_class.forward(self, x.index_select(0, rest))
            out = x.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
            out.index_copy_(0, rest, y)
        return out

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if (self.lora_groups and not torch.is_grad_enabled() and not x.is_nested
                and not self.merged_adapters and not self.lora_disabled
                and not any(self.lora_specs[n].use_dora for n, _ in self.lora_groups)):
            return self._mixed_folded(x)
        names = self._pending()
        if (len(names) != 1 or self.lora_groups is not None or x.is_nested
                or self.lora_specs[names[0]].use_dora):
            return LoRALayer.forward(self, x, *args, **kwargs)
        spec = self.lora_specs[names[0]]
        lora_a, lora_b = self._ab(names[0])
        x2 = x.reshape(-1, x.shape[-1])
        if not torch.is_grad_enabled() and x2.shape[0] >= _FOLD_ROWS and not (
                spec.dropout > 0.0 and self.training):
            # Without autograd, W + scale·B·A costs d·k·r multiply-adds once, while the
            # adapter path costs N·(d+k)·r and two more passes over x and the output.
            weight = self._combined(names).to(x2.dtype)
            out = F.linear(x2, weight, None if self.bias is None else self.bias.to(x2.dtype))
            return out.view(*x.shape[:-1], out.shape[-1])
        out = self._base_2d(x2)
        xd = self._dropped(x2, spec)
        # In-place ops skip autocast, so match the base output's dtype by hand (a no-op
        # outside autocast).
        a = F.linear(xd, lora_a).to(out.dtype)
        out = out.addmm_(a, lora_b.t().to(out.dtype), alpha=spec.scaling)
        return out.view(*x.shape[:-1], out.shape[-1])


class LoRALinear(_MatmulLoRA, nn.Linear):
    """LoRA on ``nn.Linear``."""

    _lora_base_class = nn.Linear

    def _base_2d(self, x2):
        return F.linear(x2, self.weight, self.bias)

    def _lora_shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def _lora_out(self, x, a, b):
        return F.linear(F.linear(x, a), b)

    def _delta_native(self, a, b):
        return b.float() @ a.float()

    def _base_nobias(self, x):
        return F.linear(x, self.weight)


class _LoRAConvNd(LoRALayer):
    _conv_fn: Any

    def _lora_shapes(self, r):
        k = tuple(self.kernel_size)
        return (r, self.in_channels, *k), (self.out_channels, r, *([1] * len(k)))

    def _lora_out(self, x, a, b):
        # A uses the base's stride, padding, dilation and padding mode; B is a 1×1 conv.
        return self._conv_fn(self._conv_forward(x, a, None), b)

    def _delta_native(self, a, b):
        b = b.float().flatten(1)  # (out, r)
        a = a.float()
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

    def _lora_init_weights(self, init, a, b, r):
        with torch.no_grad():
            nn.init.zeros_(a)
            nn.init.normal_(b, std=1.0 / r if init == "gaussian" else 1.0)

    def _lora_out(self, x, a, b):
        # Dropout never applies to token indices (the shared forward skips integer input).
        return F.embedding(x, a.T, padding_idx=self.padding_idx) @ b.T

    def _delta_native(self, a, b):
        return (b.float() @ a.float()).T

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

    def _lora_out(self, x, a, b):
        return F.linear(F.linear(x, a), b)

    def _delta_native(self, a, b):
        return (b.float() @ a.float()).T

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
_MADE: dict[type, type] = {}
SUPPORTED = ["nn.Linear", "nn.Conv1d", "nn.Conv2d", "nn.Embedding", "nn.MultiheadAttention",
             "transformers Conv1D"]


def hf_conv1d_type() -> type | None:
    """transformers' ``Conv1D``, if transformers is loaded (a model that has one loaded it)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def _made(lora_cls: type, base: type, name: str) -> type:
    """A LoRA class for ``base`` (HF Conv1D, or a subclass of a supported type)."""
    if base not in _MADE:
        cls = type(name, (lora_cls, base), {"_lora_base_class": base})
        cls.__module__ = __name__
        cls.__qualname__ = name
        _MADE[base] = cls
        globals()[name] = cls  # importable by name, so pickling works
    return _MADE[base]


def type_name(t: type) -> str:
    """``module.qualname`` of a type, as errors name it."""
    return f"{t.__module__}.{t.__qualname__}"


def lora_type_for(module: nn.Module, config) -> type | str:
    """The LoRA class for ``module``, or the reason it cannot carry one (worded to follow
    the module's name in a sentence)."""
    t = type(module)
    if t in _BUILTIN:
        cls = _BUILTIN[t]
    elif t is hf_conv1d_type():
        cls = _made(_LoRAConv1DMixin, t, "LoRAConv1D")
    else:
        base = next((b for b in _BUILTIN if issubclass(t, b)), None)
        if base is None:
            return (f"has type {type_name(t)}, which LoRA does not support; supported types "
                    f"are {SUPPORTED}. Narrow target_modules (for example to its Linear "
                    "children) or add it to exclude_modules.")
        own = [m for m in ("forward", "_conv_forward") if hasattr(base, m)
               and getattr(t, m) is not getattr(base, m)]
        if own:
            return (f"has type {type_name(t)}, a subclass of nn.{base.__name__} that "
                    f"overrides {own[0]}(), so an adapter cannot know what it computes; "
                    "adapt its parts instead or add it to exclude_modules.")
        cls = _made(_BUILTIN[base], t, f"LoRA{t.__name__}")
    if getattr(module, "groups", 1) != 1:
        return (f"is a grouped convolution (groups={module.groups}); LoRA supports groups=1 "
                "only. Add it to exclude_modules.")
    if config.use_dora and issubclass(cls, LoRAEmbedding):
        return ("is an nn.Embedding, which DoRA does not support; use use_dora=False or "
                "exclude it.")
    return cls


def __getattr__(name: str) -> Any:
    # ``LoRAConv1D`` exists only once transformers is importable; build it on demand so
    # that unpickling a model in a fresh process finds the class.
    if name == "LoRAConv1D":
        try:
            from transformers.pytorch_utils import Conv1D
        except Exception:  # transformers is optional
            raise AttributeError(name) from None
        return _made(_LoRAConv1DMixin, Conv1D, "LoRAConv1D")
    if name == "LoRANonDynamicallyQuantizableLinear":  # nn.MultiheadAttention's out_proj
        from torch.nn.modules.linear import NonDynamicallyQuantizableLinear as base
        return _made(LoRALinear, base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
