"""The built-in LoRA layer types, and the registry that maps a module type to its LoRA type.

A frozen weight ``W`` gets a trainable low-rank update::

            x ──────────────► W ──────────────┐
            │                                 ▼
            └─► dropout ─► A (r×k) ─► B (d×r) ─► ×scale ─► (+) ─► y

    y = W x + scale · B(A x)      scale = alpha / r   (or alpha / √r with rsLoRA)

``B`` starts at zero, so an injected model computes exactly what the base model did.
Tensor layouts follow PEFT's on-disk shapes so that adapter files translate by name only:

=============  ==================  ==================  =====================
base           lora_A              lora_B              ΔW (native layout)
=============  ==================  ==================  =====================
Linear         (r, in)             (out, r)            B @ A
ConvNd         (r, in, *kernel)    (out, r, 1, ...)    B ⊗ A over r
Embedding      (r, num)            (dim, r)            (B @ A)ᵀ
HF Conv1D      (r, in)             (out, r)            (B @ A)ᵀ
=============  ==================  ==================  =====================

Adding a type is one class and one :func:`register_layer_type` call (``docs/extending.md``);
``nn.Conv3d`` below is added exactly that way. A subclass of a registered module type is
adapted as that type unless it overrides what the type computes (``forward``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LayerTypeError
from .base import LoRALayer, type_name
from .fused import DENSE, BaseOp, linear_lora

__all__ = ["LoRAConv1d", "LoRAConv2d", "LoRAConv3d", "LoRAEmbedding", "LoRALayer", "LoRALinear",
           "hf_conv1d_type", "layer_types", "lora_type_for", "register_layer_type"]


def _same_key(a: tuple, b: tuple) -> bool:
    """Two stack keys agree: the same tensor objects, in the same state."""
    return (len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0], strict=True))
            and a[1:] == b[1:])


class MatmulLoRA(LoRALayer):
    """Layers whose base op is a matmul (Linear, HF Conv1D): one adapter is added with a
    fused ``addmm_`` on the 2-D flattened input.

    The input is flattened to 2-D so the base op returns a fresh tensor, not a view, and the
    adapter's update is added with one in-place ``addmm_``. An in-place add on the 3-D view
    that ``F.linear`` returns made autograd copy the output in backward (measured in
    ``benchmarks/``); this path does not.
    """

    all_linear = True
    can_fold = True
    can_fuse = True

    def fusable(self, x: Tensor, name: str) -> bool:
        """Whether :func:`~lora_lightning.layers.fused.linear_lora` can compute this forward:
        a plain dense frozen base (a trainable base takes the plain ops; a quantized one
        decides in its own type) in the input's dtype, or autocast, which casts everything. The adapter's small tensors are
        cast to the input's dtype, never the input to theirs: float32 adapters on a bfloat16
        base compute in bfloat16, as under autocast, and get float32 gradients."""
        w = self.base_weight()
        if type(w) not in (Tensor, nn.Parameter) or w.requires_grad or not w.is_floating_point():
            return False
        if torch.is_autocast_enabled(x.device.type):
            return True
        return x.dtype == w.dtype and (self.bias is None or self.bias.dtype == w.dtype)

    def fused_base(self) -> tuple[Tensor, BaseOp]:
        """The base for :func:`~lora_lightning.layers.fused.linear_lora`: the stored weight
        saved for backward and the op computing ``x Wᵀ + b`` and ``g W`` from it (here the
        dense out-first weight and :data:`~lora_lightning.layers.fused.DENSE`)."""
        return self.out_first(self.base_weight()), DENSE

    def fused_forward(self, x: Tensor, name: str) -> Tensor:
        spec = self.lora_specs[name]
        a, b = self._ab(name)
        (w, base), bias = self.fused_base(), self.bias
        x2 = x.reshape(-1, x.shape[-1])
        device = x.device.type
        if torch.is_autocast_enabled(device):  # cast as autocast casts F.linear's arguments
            # (a dense base only: fusable() refuses autocast for a base that is not)
            dtype = torch.get_autocast_dtype(device)
            x2, w = x2.to(dtype), w.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        a, b = a.to(x2.dtype), b.to(x2.dtype)  # no-ops when the dtypes agree
        p = spec.dropout if self.training else 0.0
        out = linear_lora(x2, w, bias, a, b, spec.scaling, p, base)
        return out.view(*x.shape[:-1], out.shape[-1])

    def folded_forward(self, x, weight):
        x2 = x.reshape(-1, x.shape[-1])
        w = self.out_first(weight).to(x2.dtype)  # out-first, as F.linear takes it
        out = F.linear(x2, w, None if self.bias is None else self.bias.to(x2.dtype))
        return out.view(*x.shape[:-1], out.shape[-1])

    def base_2d(self, x2: Tensor) -> Tensor:
        """The base op with bias on a 2-D input (a fresh tensor)."""
        raise NotImplementedError

    def _per_sample(self, x: Tensor, result: Tensor) -> Tensor:
        """A mixed batch in one gather and two batched matmuls, whatever the number of
        adapters: each adapter's A and scaled B are stacked (ranks padded with zeros, slot 0
        all zeros for samples with no adapter here), each sample picks its slot, and
        ``torch.bmm`` applies them. Plain adapters only (DoRA, or dropout in training,
        take the per-group path)."""
        groups = [(n, idx) for n, idx in (self.lora_groups or ()) if n in self.lora_specs]
        if (self.merged_adapters or self.lora_disabled or not groups or x.is_nested
                or any(self.lora_specs[n].variant is not None for n, _ in groups)
                or (self.training and any(self.lora_specs[n].dropout for n, _ in groups))):
            return super()._per_sample(x, result)
        slot, a_all, b_all = self._stacked(groups, x)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        x3 = x3 if x3.dtype == a_all.dtype else x3.to(a_all.dtype)
        if x3.shape[1] == 1 and x.device.type == "cpu":
            return self._per_sample_rows(x3.reshape(x3.shape[0], -1), result, slot, a_all, b_all)
        update = torch.bmm(torch.bmm(x3, a_all.index_select(0, slot)),
                           b_all.index_select(0, slot))
        return result + update.reshape(result.shape).to(result.dtype)

    def _per_sample_rows(self, x2: Tensor, result: Tensor, slot: Tensor, a_all: Tensor,
                         b_all: Tensor) -> Tensor:
        """One row per sample (a decode step) on CPU: rows sorted by slot, two matmuls per
        adapter present on its contiguous rows, one ``index_add``. Gathering a copy of A
        and B for each row costs about as much memory traffic as the layer's own weight
        there (one 512 -> 512 layer, 64 rows, 16 adapters r=16, one thread: base 246 us,
        gather + bmm +346 us, this +254 us; benchmarks/multi_adapter.md)."""
        order = torch.argsort(slot, stable=True)
        counts = torch.bincount(slot, minlength=a_all.shape[0]).tolist()
        xs = x2.index_select(0, order)
        parts, start = [], counts[0]  # slot 0 (no adapter here) adds nothing
        for k in range(1, len(counts)):
            if counts[k]:
                rows = xs[start:start + counts[k]]
                parts.append(torch.mm(torch.mm(rows, a_all[k]), b_all[k]))
                start += counts[k]
        if not parts:
            return result
        flat = result.reshape(result.shape[0], -1)
        update = torch.cat(parts).to(flat.dtype)
        return flat.index_add(0, order[counts[0]:], update).view(result.shape)

    def _stacked(self, groups: list[tuple[str, Tensor]], x: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """Each sample's slot, and the stacked A (K + 1, in, rank) and scaled B
        (K + 1, rank, out): slot 0 is all zeros, ranks are padded to the largest.

        Without grad, the stack holds every plain adapter of the layer and is kept on the
        layer between forwards and between ``per_sample_adapters`` blocks (a server's
        batches and a ``generate()``'s decode steps only gather from it); it is rebuilt
        when an adapter is added, removed or changed (an in-place write bumps the tensor's
        version), moved or cast. With grad it is built from this batch's adapters on each
        call, so gradients reach them."""
        names = [n for n, spec in self.lora_specs.items() if spec.variant is None]
        if torch.is_grad_enabled() or len({self._ab(n)[0].dtype for n in names}) > 1:
            names = [n for n, _ in groups]  # only this batch's (one dtype, as before)
        # The key holds the tensors themselves (compared by identity), so none of them
        # can be freed and its memory reused by a new adapter while the stack exists.
        tensors = tuple(t for n in names for t in self._ab(n))
        key = (tensors, tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors),
               tuple(self.lora_specs[n].scaling for n in names))
        cached = self.__dict__.get("_lora_stack")
        if cached is None or not _same_key(cached[0], key) or torch.is_grad_enabled():
            rank = max(self.lora_specs[n].r for n in names)
            a_parts, b_parts = [], []
            for name in names:
                a, b = self._ab(name)
                pad = rank - a.shape[0]
                a_parts.append(F.pad(a, (0, 0, 0, pad)).t())  # (in, rank)
                b_parts.append(F.pad(b * self.lora_specs[name].scaling, (0, pad)).t())
            a_all = torch.stack([torch.zeros_like(a_parts[0]), *a_parts])  # (K+1, in, rank)
            b_all = torch.stack([torch.zeros_like(b_parts[0]), *b_parts])  # (K+1, rank, out)
            cached = (key, {n: k for k, n in enumerate(names, start=1)}, a_all, b_all, None)
            if not torch.is_grad_enabled():  # tensors built with grad would hold their graph
                self.__dict__["_lora_stack"] = cached
        key, position, a_all, b_all, slots = cached
        if slots is not None and slots[0] is self.lora_groups and slots[1].device == x.device:
            return slots[1], a_all, b_all
        slot = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for name, idx in groups:
            slot[idx] = position[name]
        if self.__dict__.get("_lora_stack") is cached:
            # The slots hold for the rest of this block (the groups list is the block's).
            self.__dict__["_lora_stack"] = (key, position, a_all, b_all,
                                            (self.lora_groups, slot))
        return slot, a_all, b_all

    def lora_forward(self, x, a, b):
        return F.linear(F.linear(x, a), b)

    def _add_in_place(self, x: Tensor, name: str) -> Tensor:
        """The base op on the 2-D input, then ``out += s·(x Aᵀ) Bᵀ`` as one ``addmm_`` (the
        scale is its ``alpha``): three kernels, and no cast, reshape or dropout call where
        none is needed. This is the single-adapter forward without grad, where each
        layer's Python counts at a decode step (``benchmarks/multi_adapter.md``)."""
        spec = self.lora_specs[name]
        lora_a, lora_b = self._ab(name)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        out = self.base_2d(x2)
        xd = self._dropped(x2, spec) if spec.dropout else x2
        ax = F.linear(xd if xd.dtype == lora_a.dtype else xd.to(lora_a.dtype), lora_a)
        # In-place ops skip autocast, so match the base output's dtype by hand.
        if ax.dtype != out.dtype:
            ax = ax.to(out.dtype)
        bt = lora_b.t() if lora_b.dtype == out.dtype else lora_b.t().to(out.dtype)
        out = out.addmm_(ax, bt, alpha=spec.scaling)
        return out if x2 is x else out.view(*x.shape[:-1], out.shape[-1])


class LoRALinear(MatmulLoRA, nn.Linear):
    """LoRA on ``nn.Linear``."""

    _lora_base_class = nn.Linear
    gradient_init = True

    def base_2d(self, x2):
        return F.linear(x2, self.weight, self.bias)

    def lora_shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def delta_weight(self, a, b):
        return b.float() @ a.float()

    def base_without_bias(self, x):
        return F.linear(x, self.weight)


class ConvLoRA(LoRALayer):
    """LoRA on a convolution (groups = 1, any kernel size): A is a conv with the base's
    kernel, stride, padding and dilation; B is a 1×1 conv."""

    _conv_fn: Any
    gradient_init = True
    overridable = ("forward", "_conv_forward")

    @classmethod
    def check_module(cls, module, config):
        if getattr(module, "groups", 1) != 1:
            return (f"is a grouped convolution (groups={module.groups}); LoRA supports groups=1 "
                    "only. Add it to exclude_modules.")
        return super().check_module(module, config)

    def lora_shapes(self, r):
        k = tuple(self.kernel_size)
        return (r, self.in_channels, *k), (self.out_channels, r, *([1] * len(k)))

    def lora_forward(self, x, a, b):
        return self._conv_fn(self._conv_forward(x, a, None), b)

    def delta_weight(self, a, b):
        b = b.float().flatten(1)  # (out, r)
        a = a.float()
        return (b @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])

    def base_without_bias(self, x):
        return self._conv_forward(x, self.weight, None)

    def bias_view(self):
        return self.bias.view(1, -1, *([1] * (self.weight.dim() - 2)))

    def magnitude_shape(self):
        return (1, self.out_channels, *([1] * (self.weight.dim() - 2)))


class LoRAConv1d(ConvLoRA, nn.Conv1d):
    """LoRA on ``nn.Conv1d``."""

    _lora_base_class = nn.Conv1d
    _conv_fn = staticmethod(F.conv1d)


class LoRAConv2d(ConvLoRA, nn.Conv2d):
    """LoRA on ``nn.Conv2d``."""

    _lora_base_class = nn.Conv2d
    _conv_fn = staticmethod(F.conv2d)


class LoRAConv3d(ConvLoRA, nn.Conv3d):
    """LoRA on ``nn.Conv3d``."""

    _lora_base_class = nn.Conv3d
    _conv_fn = staticmethod(F.conv3d)


class LoRAEmbedding(LoRALayer, nn.Embedding):
    """LoRA on ``nn.Embedding``. As in PEFT, A starts at zero and B is random."""

    _lora_base_class = nn.Embedding
    supported_variants = ()
    peft_embedding_keys = True

    def lora_shapes(self, r):
        return (r, self.num_embeddings), (self.embedding_dim, r)

    def init_adapter(self, init, a, b, r):
        with torch.no_grad():
            nn.init.zeros_(a)
            nn.init.normal_(b, std=1.0 / r if init == "gaussian" else 1.0)

    def lora_forward(self, x, a, b):
        # Dropout never applies to token indices (the shared forward skips integer input).
        return F.embedding(x, a.T, padding_idx=self.padding_idx) @ b.T

    def delta_weight(self, a, b):
        return (b.float() @ a.float()).T

    def out_first(self, w):
        return w.T


class HFConv1DLoRA(MatmulLoRA):
    """LoRA on HF ``transformers`` ``Conv1D`` (GPT-2 style: weight is (in, out))."""

    fan_in_fan_out = True
    gradient_init = True

    def base_2d(self, x2):
        if self.bias is None:
            return x2 @ self.weight
        return torch.addmm(self.bias, x2, self.weight)

    def lora_shapes(self, r):
        return (r, self.nx), (self.nf, r)

    def delta_weight(self, a, b):
        return (b.float() @ a.float()).T

    def base_without_bias(self, x):
        return x @ self.weight

    def out_first(self, w):
        return w.T


# -- the registry ------------------------------------------------------------------------
_TYPES: dict[type, type] = {}
"""Module type -> its LoRA type, in registration order (subclass lookup follows it)."""
_MADE: dict[tuple[type, type], type] = {}
"""(LoRA type, module type) -> the LoRA class made for that module subclass."""


def register_layer_type(base_class: type[nn.Module], lora_class: type) -> None:
    """Adapt modules of type ``base_class`` (and subclasses that keep its ``forward``) with
    ``lora_class``, a subclass of :class:`~lora_lightning.layers.base.LoRALayer` and of
    ``base_class`` that defines ``lora_shapes``, ``lora_forward`` and ``delta_weight``
    (see :class:`~lora_lightning.layers.base.LoRALayer` for the whole contract).
    Registering a type again replaces its LoRA type.

    >>> class Scale(nn.Module):  # a module of one's own
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.ones(n))
    ...     def forward(self, x):
    ...         return x * self.weight
    >>> class LoRAScale(LoRALayer, Scale):
    ...     def lora_shapes(self, r): return (r, 1), (self.weight.shape[0], r)
    ...     def lora_forward(self, x, a, b): return x * (b @ a).squeeze(1)
    ...     def delta_weight(self, a, b): return (b.float() @ a.float()).squeeze(1)
    >>> register_layer_type(Scale, LoRAScale)
    """
    if not isinstance(base_class, type) or not issubclass(base_class, nn.Module):
        raise LayerTypeError(base_class, lora_class, "base_class must be an nn.Module subclass")
    if not (isinstance(lora_class, type) and issubclass(lora_class, LoRALayer)
            and issubclass(lora_class, base_class)):
        raise LayerTypeError(base_class, lora_class, (
            f"lora_class must subclass both LoRALayer and {base_class.__name__} (for example "
            f"`class LoRA{base_class.__name__}(LoRALayer, {base_class.__name__})`)"))
    # lora_forward is what the shared forward calls; a type with its own forward (one
    # that applies the update as a weight, like MultiheadAttention's) needs none.
    needed = ("lora_shapes", "delta_weight") + (
        () if lora_class.forward is not LoRALayer.forward else ("lora_forward",))
    missing = [m for m in needed if getattr(lora_class, m) is getattr(LoRALayer, m)]
    if missing:
        raise LayerTypeError(base_class, lora_class, f"lora_class must define {missing}")
    if lora_class.__dict__.get("_lora_base_class") is None:
        lora_class._lora_base_class = base_class
    _TYPES[base_class] = lora_class


def layer_types() -> dict[type, type]:
    """Module type -> LoRA type, for every registered type (HF Conv1D once transformers is
    loaded, bitsandbytes' quantized linears once bitsandbytes is)."""
    _register_lazy()
    return dict(_TYPES)


def hf_conv1d_type() -> type | None:
    """transformers' ``Conv1D``, if transformers is loaded (a model that has one loaded it)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


_LAZY: list[Callable[[], None]] = []
"""Registrations of types from optional packages, run before each lookup: each registers its
types once their package is loaded (a model that holds one loaded it)."""


def register_lazily(register: Callable[[], None]) -> None:
    """Run ``register`` before every type lookup (it must be cheap and idempotent)."""
    if register not in _LAZY:
        _LAZY.append(register)


def _register_lazy() -> None:
    _register_hf_conv1d()
    for register in _LAZY:
        register()


def _register_hf_conv1d() -> None:
    conv1d = hf_conv1d_type()
    if conv1d is not None and conv1d not in _TYPES:
        _TYPES[conv1d] = _made(HFConv1DLoRA, conv1d, "LoRAConv1D")


def _made(lora_cls: type, base: type, name: str) -> type:
    """A LoRA class for ``base`` made from ``lora_cls`` (HF Conv1D, or a subclass of a
    registered type)."""
    if (lora_cls, base) not in _MADE:
        cls = type(name, (lora_cls, base), {"_lora_base_class": base})
        cls.__module__ = __name__
        cls.__qualname__ = name
        _MADE[lora_cls, base] = cls
        globals()[name] = cls  # importable by name, so pickling works
    return _MADE[lora_cls, base]


def short_name(t: type) -> str:
    """``nn.Linear`` for torch's module types, ``module.qualname`` for others."""
    return f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else type_name(t)


def _nearest_base(t: type) -> type | None:
    """The registered type nearest to ``t`` in its MRO (bitsandbytes' ``LinearNF4`` is a
    ``Linear4bit`` before it is an ``nn.Linear``), or ``None``."""
    bases = [b for b in _TYPES if issubclass(t, b)]
    return min(bases, key=t.__mro__.index) if bases else None


def registered_type(module_type: type) -> type | None:
    """The LoRA type registered for ``module_type`` or its nearest registered base."""
    _register_lazy()
    if issubclass(module_type, LoRALayer):
        return module_type
    if module_type in _TYPES:
        return _TYPES[module_type]
    base = _nearest_base(module_type)
    return None if base is None else _TYPES[base]


def lora_type_for(module: nn.Module, config: Any) -> type | str:
    """The LoRA class for ``module``, or the reason it cannot carry one (worded to follow
    the module's name in a sentence)."""
    _register_lazy()
    t = getattr(type(module), "_saved_base_class", type(module))  # a modules_to_save copy
    if isinstance(module, LoRALayer):  # adding another adapter: only the config can refuse
        return t.check_config(config) or t
    cls = _TYPES.get(t)
    if cls is None:
        base = _nearest_base(t)
        if base is None:
            supported = [short_name(b) for b in _TYPES]
            return (f"has type {type_name(t)}, which LoRA does not support; supported types "
                    f"are {supported} (register_layer_type adds one). Narrow target_modules "
                    "(for example to its Linear children) or add it to exclude_modules.")
        reason = _TYPES[base].check_module(module, config)
        if reason is not None:
            return reason
        return _made(_TYPES[base], t, f"LoRA{t.__name__}")
    return cls.check_module(module, config) or cls


for _base, _lora in ((nn.Linear, LoRALinear), (nn.Conv1d, LoRAConv1d),
                     (nn.Conv2d, LoRAConv2d), (nn.Conv3d, LoRAConv3d),
                     (nn.Embedding, LoRAEmbedding)):
    register_layer_type(_base, _lora)


def __getattr__(name: str) -> Any:
    # ``LoRAConv1D`` exists only once transformers is importable; build it on demand so
    # that unpickling a model in a fresh process finds the class.
    if name == "LoRAConv1D":
        try:
            from transformers.pytorch_utils import Conv1D
        except Exception:  # transformers is optional
            raise AttributeError(name) from None
        _register_hf_conv1d()
        return _made(HFConv1DLoRA, Conv1D, "LoRAConv1D")
    if name == "LoRANonDynamicallyQuantizableLinear":  # nn.MultiheadAttention's out_proj
        from torch.nn.modules.linear import NonDynamicallyQuantizableLinear as base
        return _made(LoRALinear, base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
