"""``LoRALayer``: the layer contract every LoRA type fulfils, and what all types share.

A LoRA layer *is* its base module: injection swaps the instance's class to a subclass
(``LoRALinear`` is an ``nn.Linear``), so ``weight`` and ``bias`` keep their names and a
plain base state dict loads with no renaming. The only new state-dict keys are the
adapters'.

**The contract.** A LoRA type describes itself; the planner, the file format, merge,
checkpoints and per-sample batching ask it instead of testing types:

* class attributes: ``_lora_base_class`` (the module type it adapts), ``weight_name``,
  ``all_linear`` (part of ``target_modules="all-linear"``), ``supports_per_sample``,
  ``supports_dropout``, ``supported_variants`` (``("dora",)`` or ``()``),
  ``peft_embedding_keys`` and ``fan_in_fan_out`` (PEFT's key names and flag),
  ``gradient_init`` (``A`` may start from the weight gradient);
* :meth:`check_module` (why a module cannot carry an adapter) and :meth:`companions`
  (children adapted with it, as MultiheadAttention's ``out_proj``);
* the math: :meth:`lora_shapes`, :meth:`lora_forward` (``B(A x)``), :meth:`delta_weight`
  (``B·A`` in the base weight's layout) and :meth:`out_first`.

**The base-weight seam.** Everything that reads or writes the frozen weight as numbers
(merge, unmerge, DoRA's norm, the merged export) goes through :meth:`dense_weight` and
:meth:`write_weight`; new adapters take :meth:`adapter_dtype` (from :meth:`base_dtype`).
A quantized base (``layers/quantized.py``: bitsandbytes' 4-bit and 8-bit linears) says
what merging into it loses (:attr:`merge_loss`) and can turn dense
(:meth:`dequantize_base`); an adapter dtype other than the base's is a change here too,
not across the core.

**One forward.** :meth:`forward` is the base forward plus :meth:`delta` for each pending
adapter; the strategy (one adapter added in place, one folded into the weight for many
rows without autograd on CPU, several, or per-sample groups) is chosen in one place,
:meth:`_route`, and each fast path is kept because a benchmark measured it faster. ``delta`` is ``s·B(A x)``, or what the adapter's variant (DoRA)
makes of it.

A layer holds one or more named adapters (:class:`AdapterSpec`). The adapter named
``"default"`` keeps the historical parameter names ``lora_A``, ``lora_B`` and
``lora_magnitude``; another adapter ``x`` uses ``lora_A_x``, ``lora_B_x`` and
``lora_magnitude_x``. Merging is explicit (:meth:`merge`/:meth:`unmerge`); it never
happens on ``train()``/``eval()``, because Lightning flips ``.training`` directly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MergedLayersError, PerSampleError
from .names import ADAPTER_NAME, ADAPTER_PARAM_NAMES, DEFAULT_ADAPTER, param_names, type_name
from .variants import LoRAVariant

FOLD_MIN_ROWS = 4096
"""Rows from which a forward without autograd on CPU folds one adapter into the weight:
below it, building W + s·B·A costs more than it saves (measured on CPU by
``benchmarks/bench_forward_paths.py``; not measured on a GPU, where the adapter path runs)."""

__all__ = ["FOLD_MIN_ROWS", "ADAPTER_NAME", "ADAPTER_PARAM_NAMES", "DEFAULT_ADAPTER", "AdapterSpec", "LoRALayer",
           "param_names", "resolve_dtype", "type_name"]

def resolve_dtype(base: torch.dtype, rule: str | None = None) -> torch.dtype:
    """The one dtype rule (``LoRAConfig.adapter_dtype``) for what trains on a base of dtype
    ``base`` (adapters, DoRA magnitudes, ``modules_to_save``): ``None`` float32 on a
    half-precision or non-float base, else ``base``; ``"base"`` the base's (float32 for a
    non-float base); a dtype name that dtype."""
    if rule not in (None, "base"):
        return getattr(torch, rule)
    if not base.is_floating_point:
        return torch.float32
    if rule is None and base in (torch.float16, torch.bfloat16):
        return torch.float32
    return base


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A floating-point input in the adapters' dtype (token indices stay as they are)."""
    return x.to(dtype) if x.is_floating_point() else x


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's settings on one layer."""

    r: int
    alpha: float
    scaling: float
    dropout: float
    variant: LoRAVariant | None = None
    dtype_rule: str | None = None
    """``LoRAConfig.adapter_dtype``: what :meth:`LoRALayer.adapter_dtype` resolves."""

    @property
    def use_dora(self) -> bool:
        return self.variant is not None and self.variant.name == "dora"


class LoRALayer:
    """Mixin shared by every LoRA layer type (see the module docstring). Never
    instantiated directly: injection swaps a module's class to a subclass of this and of
    the module's own type.

    Set at injection: ``lora_specs`` (adapter name -> :class:`AdapterSpec`),
    ``lora_active`` (names the forward applies), ``merged_adapters`` (names folded into
    the weight), ``lora_disabled`` and ``lora_groups`` (per-sample adapters, or ``None``).
    ``r``, ``alpha``, ``scaling``, ``lora_dropout_p`` and ``use_dora`` read the settings of
    the first active adapter (the only one, in a single-adapter model).
    """

    # -- the type's description (override in a LoRA type) ---------------------------
    _lora_base_class: ClassVar[type[nn.Module]]
    weight_name: ClassVar[str] = "weight"
    """The adapted parameter (MultiheadAttention: ``in_proj_weight``)."""
    bias_name: ClassVar[str] = "bias"
    """Its bias parameter (MultiheadAttention: ``in_proj_bias``)."""
    all_linear: ClassVar[bool] = False
    """Whether ``target_modules="all-linear"`` includes this type."""
    supports_per_sample: ClassVar[bool] = True
    """Whether :func:`~lora_lightning.adapters.per_sample_adapters` can apply it per sample."""
    supports_dropout: ClassVar[bool] = True
    """Whether LoRA dropout can apply to its input (not for a weight-update forward)."""
    supported_variants: ClassVar[tuple[str, ...]] = ("dora",)
    peft_embedding_keys: ClassVar[bool] = False
    """PEFT names its tensors ``lora_embedding_A`` (no ``.weight``), as for embeddings."""
    fan_in_fan_out: ClassVar[bool] = False
    """The base weight is stored (in, out), as PEFT's ``fan_in_fan_out`` flag says."""
    gradient_init: ClassVar[bool] = False
    """Whether ``LoRAConfig(init="gradient")`` can set ``A`` from the weight gradient: the
    layer computes with ``W + s·ΔW``, ``out_first(delta_weight(a, b))`` is
    ``b.flatten(1) @ a.flatten(1)`` reshaped, and ``B`` starts at zero."""
    overridable: ClassVar[tuple[str, ...]] = ("forward",)
    """Methods of the base type a subclass must not override to be adapted as that type."""

    weight: Tensor
    bias: Tensor | None

    @classmethod
    def check_module(cls, module: nn.Module, config: Any) -> str | None:
        """Why ``module`` cannot carry an adapter of ``config`` (worded to follow the
        module's name in a sentence), or ``None`` if it can."""
        # a modules_to_save copy (``heads.SavedModule``) counts as its own type
        t = getattr(type(module), "_saved_base_class", type(module))
        base = cls._lora_base_class
        own = [m for m in cls.overridable if hasattr(base, m)
               and getattr(t, m) is not getattr(base, m)]
        if t is not base and own and not issubclass(t, LoRALayer):
            base_name = f"nn.{base.__name__}" if base.__module__.startswith("torch.nn") else (
                type_name(base))
            return (f"has type {type_name(t)}, a subclass of {base_name} that overrides "
                    f"{own[0]}(), so an adapter cannot know what it computes; adapt its parts "
                    "instead or add it to exclude_modules.")
        return cls.check_config(config)

    @classmethod
    def check_config(cls, config: Any) -> str | None:
        """Why this type cannot carry an adapter with ``config``'s settings, or ``None``."""
        from .variants import variant_for

        variant = variant_for(config)
        if variant is not None and (reason := variant.unsupported(cls)):
            return reason + "."
        if config.dropout and not cls.supports_dropout:
            base = cls._lora_base_class.__name__
            return (f"is an nn.{base}, whose adapter is applied as a weight update, so LoRA "
                    f"dropout (dropout={config.dropout}) cannot apply to its input; use "
                    "dropout=0 or exclude it.")
        return None

    @classmethod
    def companions(cls, module: nn.Module) -> dict[str, nn.Module]:
        """Children (by local name) that get an adapter of the same rank with this one,
        and are never targets on their own."""
        return {}

    def lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for rank ``r`` (PEFT's on-disk shapes)."""
        raise NotImplementedError(f"{type(self).__name__} must define lora_shapes")

    def lora_forward(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """``B(A(x))``, unscaled, in the layout of the base output."""
        raise NotImplementedError(f"{type(self).__name__} must define lora_forward")

    def delta_weight(self, a: Tensor, b: Tensor) -> Tensor:
        """``B·A`` in the base weight's layout, unscaled, in float32."""
        raise NotImplementedError(f"{type(self).__name__} must define delta_weight")

    def out_first(self, w: Tensor) -> Tensor:
        """View a weight-shaped tensor with the output dimension first (the identity or a
        transpose: applying it twice gives ``w`` back)."""
        return w

    def init_adapter(self, init: str, a: Tensor, b: Tensor, r: int) -> None:
        """Initialise a new adapter so that its update is zero (B = 0 by default)."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def base_without_bias(self, x: Tensor) -> Tensor:
        """The base op without its bias (DoRA with dropout needs it)."""
        raise NotImplementedError(f"DoRA is not supported for {type(self).__name__}")

    def bias_view(self) -> Tensor:
        """The bias shaped to broadcast over the base output."""
        return self.bias

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_first(self.base_weight()).shape[0],)

    # -- the base-weight seam ----------------------------------------------------------
    def base_weight(self) -> Tensor:
        """The adapted parameter as stored."""
        return getattr(self, self.weight_name)

    def dense_weight(self) -> Tensor:
        """The base weight as a dense float32 tensor in its own layout."""
        return self.base_weight().float()

    @torch.no_grad()
    def write_weight(self, value: Tensor) -> None:
        """Store ``value`` (dense, the weight's layout) as the base weight, in its dtype."""
        w = self.base_weight()
        w.copy_(value.to(w.dtype))

    def base_dtype(self) -> torch.dtype:
        """The dtype the base computes in: its weight's (a quantized base: its compute
        dtype)."""
        return self.base_weight().dtype

    def adapter_dtype(self, rule: str | None = None) -> torch.dtype:
        """The dtype adapter tensors get under ``rule`` (``LoRAConfig.adapter_dtype``):
        by default float32 on a half-precision or non-float base, else the base's."""
        return resolve_dtype(self.base_dtype(), rule)

    merge_loss: ClassVar[str | None] = None
    """What writing a merged weight into this base loses (a quantized base rounds it to its
    grid), or ``None``: merging then needs an explicit ``requantize=True`` or
    :meth:`dequantize_base` first (:func:`~lora_lightning.merge.merge_lora`)."""

    def dequantize_base(self, dtype: torch.dtype = torch.float32) -> None:
        """Turn a quantized base into a dense one of ``dtype``, in place (adapters kept).
        Only types with a :attr:`merge_loss` have one to turn."""
        raise NotImplementedError(f"{type(self).__name__} has a dense base already")

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # ``module.to(dtype)`` (Lightning's "bf16-true" converts the whole module) would
        # turn the adapters into the base's dtype: put each adapter back into its own, from
        # its values before the conversion (a round trip through bf16 would round them).
        before = {attr: (p.data, p.grad) for name in self.__dict__.get("lora_specs", {})
                  for attr in self.adapter_param_names(name)
                  if (p := getattr(self, attr)) is not None}
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        for name, spec in self.__dict__.get("lora_specs", {}).items():
            want = self.adapter_dtype(spec.dtype_rule)
            for attr in self.adapter_param_names(name):
                p = getattr(self, attr)
                if p.dtype != want:
                    data, grad = before[attr]
                    p.data = data.to(device=p.device, dtype=want)
                    if p.grad is not None:
                        p.grad = (grad if grad is not None else p.grad).to(
                            device=p.device, dtype=want)
        return out

    # -- construction ------------------------------------------------------------------
    def _lora_setup(self) -> None:
        """Turn the swapped-in module into a LoRA layer with no adapter yet."""
        self.lora_specs: dict[str, AdapterSpec] = {}
        self.lora_active: list[str] = []
        self.merged_adapters: list[str] = []
        self.lora_disabled = False
        self.lora_groups: list[tuple[str, Tensor]] | None = None
        self._merge_state: Tensor | None = None
        self._lora_absent_keys: list[str] = []
        self._lora_hooks = (
            self.register_load_state_dict_pre_hook(self._lora_pre_load_hook),
            self.register_load_state_dict_post_hook(self._lora_post_load_hook),
        )

    def _refuse_if_merged(self, operation: str) -> None:
        if self.merged_adapters:
            raise MergedLayersError(operation, [type(self).__name__])

    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout: float,
                    init: str, variant: LoRAVariant | None = None,
                    dtype_rule: str | None = None) -> None:
        """Add adapter ``name`` (its update starts at zero, so the output is unchanged)."""
        self._refuse_if_merged(f"adding adapter {name!r}")
        a_name, b_name, _ = param_names(name)
        a_shape, b_shape = self.lora_shapes(r)
        device, dtype = self.base_weight().device, self.adapter_dtype(dtype_rule)
        a = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
        b = nn.Parameter(torch.empty(b_shape, dtype=dtype, device=device))
        self.init_adapter(init, a, b, r)
        setattr(self, a_name, a)
        setattr(self, b_name, b)
        self.lora_specs[name] = AdapterSpec(r, alpha, scaling, dropout, variant, dtype_rule)
        if variant is not None:
            variant.create(self, name)

    def remove_adapter(self, name: str) -> None:
        """Delete adapter ``name`` and its parameters (the layer must not be merged)."""
        self._refuse_if_merged(f"removing adapter {name!r}")
        for attr in self.adapter_param_names(name):
            delattr(self, attr)
        del self.lora_specs[name]
        self.lora_active = [n for n in self.lora_active if n != name]
        self.__dict__.pop("_lora_stack", None)  # MatmulLoRA's stack holds its tensors

    def _lora_teardown(self) -> None:
        """Remove every adapter's parameters and the hooks (the class swap is the caller's)."""
        for handle in self._lora_hooks:
            handle.remove()
        for name in list(self.lora_specs):
            for attr in self.adapter_param_names(name):
                delattr(self, attr)
        for attr in ("lora_specs", "lora_active", "merged_adapters", "lora_disabled",
                     "lora_groups", "_merge_state", "_lora_absent_keys", "_lora_hooks",
                     "_lora_owner_registry", "_lora_stack"):
            self.__dict__.pop(attr, None)

    def adapter_param_names(self, adapter: str | None = None) -> tuple[str, ...]:
        """Local names of one adapter's parameters (of every adapter when ``None``)."""
        names = list(self.lora_specs) if adapter is None else [adapter]
        out: list[str] = []
        for n in names:
            out += param_names(n)[:2]
            variant = self.lora_specs[n].variant
            if variant is not None:
                out += variant.param_names(n)
        return tuple(out)

    def _ab(self, name: str) -> tuple[Tensor, Tensor]:
        a, b, _ = param_names(name)
        return getattr(self, a), getattr(self, b)

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

    # -- forward -----------------------------------------------------------------------
    can_fold: ClassVar[bool] = False
    """Whether :meth:`folded_forward` exists (matmul types)."""

    def folded_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        """The base op with ``weight`` (float32, the weight's layout) in place of the base
        weight: without autograd on many rows, one matmul with W + s·B·A is cheaper than
        the base matmul plus two skinny ones (``FOLD_MIN_ROWS``)."""
        raise NotImplementedError

    can_fuse: ClassVar[bool] = False
    """Whether :meth:`fused_forward` exists (matmul types): one adapter in training as one
    autograd node (``layers/fused.py``), where :meth:`fusable` allows it."""

    def fusable(self, x: Tensor, name: str) -> bool:
        """Whether :meth:`fused_forward` can run adapter ``name`` on ``x``."""
        return False

    def fused_forward(self, x: Tensor, name: str) -> Tensor:
        """Base output plus one plain adapter's update, with one autograd node."""
        raise NotImplementedError

    def base_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The base module's own forward."""
        return self._lora_base_class.forward(self, x, *args, **kwargs)

    def _dropped(self, x: Tensor, spec: AdapterSpec) -> Tensor:
        """The adapter's input: ``x`` with its LoRA dropout in train mode (never on token
        indices), or ``x`` itself."""
        if spec.dropout > 0.0 and self.training and x.is_floating_point():
            return F.dropout(x, spec.dropout, training=True)
        return x

    def delta(self, x: Tensor, base_out: Tensor, name: str) -> Tensor:
        """What adapter ``name`` adds to the base output ``base_out`` of input ``x``: the one
        delta function every path uses. Adapters may have another dtype than the base
        (``adapter_dtype``): the input is cast to theirs and the update to the output's
        (no-ops when they agree)."""
        spec = self.lora_specs[name]
        a, b = self._ab(name)
        xd = self._dropped(x, spec)
        lora = self.lora_forward(_as(xd, a.dtype), a, b).to(base_out.dtype)
        if spec.variant is None:
            return lora * spec.scaling
        return spec.variant.delta(self, name, x, xd, base_out, lora).to(base_out.dtype)

    def _add_in_place(self, x: Tensor, name: str) -> Tensor:
        """Base output plus one plain adapter's update, added in place: the base op's
        backward never needs its own output, so this saves an output-sized temporary.
        Matmul types override it with a fused ``addmm_``."""
        spec = self.lora_specs[name]
        result = self.base_forward(x)
        a, b = self._ab(name)
        lora = self.lora_forward(_as(self._dropped(x, spec), a.dtype), a, b)
        return result.add_(lora.to(result.dtype), alpha=spec.scaling)

    def _route(self, x: Tensor, names: list[str], extra_args: bool) -> str:
        """The one place a forward strategy is chosen (see the module docstring)."""
        if self.lora_groups is not None:
            return "per_sample"
        if not names:
            return "base"
        if len(names) > 1 or extra_args or x.is_nested or self.lora_specs[names[0]].variant:
            return "deltas"
        if not torch.is_grad_enabled():  # inference: fold or add in place, never fuse
            spec = self.lora_specs[names[0]]
            if (self.can_fold and x.is_cpu and x.numel() >= FOLD_MIN_ROWS * x.shape[-1]
                    and not (spec.dropout > 0.0 and self.training)):
                return "folded"
            return "in_place"
        if self.can_fuse and self.fusable(x, names[0]):
            return "fused"
        return "in_place"

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        names = [] if self.lora_groups is not None else self._pending()
        route = self._route(x, names, bool(args or kwargs))
        if route == "per_sample":
            return self._per_sample(x, self.base_forward(x, *args, **kwargs))
        if route == "base":
            return self.base_forward(x, *args, **kwargs)
        if route == "folded":
            return self.folded_forward(x, self.out_first(self.combined_weight(names)))
        if route == "fused":
            return self.fused_forward(x, names[0])
        if route == "in_place":
            return self._add_in_place(x, names[0])
        result = self.base_forward(x, *args, **kwargs)
        out = result
        for n in names:  # several adapters: each sees the pure base output (DoRA needs it)
            out = out + self.delta(x, result, n)
        return out

    def _per_sample(self, x: Tensor, result: Tensor) -> Tensor:
        """Each group of samples (batch dimension 0) gets its own adapter; samples in no
        group get exactly the base output."""
        if self.merged_adapters:
            raise MergedLayersError("per-sample adapters", [type(self).__name__])
        if not self.supports_per_sample:
            raise PerSampleError(type(self)._lora_base_class.__name__)
        if self.lora_disabled:
            return result
        update = None
        for name, idx in self.lora_groups:
            if name not in self.lora_specs:
                continue  # this layer carries no such adapter: base output for those samples
            xs, rs = x.index_select(0, idx), result.index_select(0, idx)
            if update is None:  # one buffer for every group: no output-sized copy per group
                update = torch.zeros_like(result)
            update.index_add_(0, idx, self.delta(xs, rs, name).to(result.dtype))
        return result if update is None else result + update

    # -- the update and merging, written once --------------------------------------------
    def _update(self, names: list[str]) -> Tensor:
        """Σ scale·B·A over ``names``, output dimension first, float32."""
        total = None
        for n in names:
            term = self.lora_specs[n].scaling * self.out_first(self.delta_weight(*self._ab(n)))
            total = term if total is None else total + term
        return total

    def combined_weight(self, names: list[str]) -> Tensor:
        """W + Σ scale·B·A with the output dimension first, in float32: the merge formula."""
        return self.out_first(self.dense_weight()) + self._update(names)

    def _merged_values(self, names: list[str]) -> tuple[Tensor, Tensor | None]:
        """The out-first float32 weight once ``names`` are merged, and the state a variant
        needs to unmerge it."""
        new = self.combined_weight(names)
        variant = self.lora_specs[names[0]].variant
        if variant is None:
            return new, None
        return variant.merged(self, names[0], new)

    def _write_out_first(self, value: Tensor) -> None:
        self.write_weight(self.out_first(value))

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters into the base weight (the active ones by default; in float32, cast
        once). A variant that merges only alone (DoRA) refuses company."""
        names = [n for n in (self._pending() if names is None else names)
                 if n not in self.merged_adapters]
        if not names:
            return
        together = self.merged_adapters + names
        alone = [n for n in together if (v := self.lora_specs[n].variant) and v.merges_alone]
        if len(together) > 1 and alone:
            raise MergedLayersError(
                f"merging adapters {together} together", [type(self).__name__],
                f"{self.lora_specs[alone[0]].variant.title} adapters merge only alone (their "
                "scale depends on the whole weight); merge one, or keep them unmerged")
        if self.merged_adapters:  # plain LoRA: the updates add up
            self._write_out_first(self.out_first(self.dense_weight()) + self._update(names))
        else:
            new, self._merge_state = self._merged_values(names)
            self._write_out_first(new)
        self.merged_adapters = together

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged update from the base weight again. No-op if not merged."""
        if not self.merged_adapters:
            return
        cur = self.out_first(self.dense_weight())
        first = self.merged_adapters[0]
        if self._merge_state is not None:
            cur = self.lora_specs[first].variant.unmerged(self, first, cur, self._merge_state)
            self._merge_state = None
        self._write_out_first(cur - self._update(self.merged_adapters))
        self.merged_adapters = []

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The dense weight an un-injected module needs to compute this layer's output, in
        the base weight's dtype (float32 for a non-float base)."""
        names = self._pending()
        w = self.base_weight()
        dtype = w.dtype if w.is_floating_point() else torch.float32
        if not names:
            return self.dense_weight().to(dtype).detach().clone()
        if self.merged_adapters:
            raise MergedLayersError(
                "merged_weight", [type(self).__name__],
                "some active adapters are merged and others not; merge or unmerge them all")
        return self.out_first(self._merged_values(names)[0]).to(dtype).contiguous()

    def extra_repr(self) -> str:
        base = self._lora_base_class.extra_repr(self)
        adapters = ", ".join(f"{n}(r={s.r}, alpha={s.alpha:g}, scaling={s.scaling:g}"
                             f"{', ' + s.variant.name if s.variant else ''})"
                             for n, s in self.lora_specs.items())
        return (f"{base}, adapters=[{adapters}], active={self.lora_active}, "
                f"merged={self.merged_adapters}")
