"""Injection and freezing, from an :class:`~lora_lightning.plan.InjectionPlan`.

``inject_lora(model, config)`` resolves the config into a plan (which module gets which
adapter, and why others were left out; see ``plan.py``), swaps each planned module's class
to its LoRA type in place (no copies, so injecting into thousands of layers is fast), then
freezes everything except the adapters, the ``modules_to_save`` and the biases that
``config.bias`` selects. With ``config.quantize_base``, each planned ``nn.Linear`` is first
replaced by a bitsandbytes 4-bit or 8-bit linear (QLoRA; see ``quantize.py``). Calling it again on an injected model changes nothing: trained
adapters are never reset.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from .adapters import activate, assign_heads
from .config import LoRAConfig
from .errors import (
    AdapterConflictError,
    ArgumentTypeError,
    MergedLayersError,
    RankTooLargeError,
)
from .heads import plain_head
from .layers import DEFAULT_ADAPTER, LoRALayer, block_fast_paths, variant_for
from .params import ParamCount, count_parameters
from .plan import InjectionPlan, Skipped, plan_injection
from .quantize import quantize_planned
from .registry import (
    OWNER_ATTR,
    REGISTRY_ATTR,
    AdapterRegistry,
    check_name,
    find_config,
    lora_layers,
    lora_param_keys,
)

__all__ = ["InjectionReport", "find_config", "inject_lora", "lora_layers", "lora_param_keys"]


@dataclass
class InjectionReport:
    """What ``inject_lora`` did."""

    injected: list[str] = field(default_factory=list)
    """Names of modules adapted by this call."""
    already_injected: list[str] = field(default_factory=list)
    """Names of matching modules that already carried an adapter (left untouched)."""
    by_type: dict[str, int] = field(default_factory=dict)
    """Count of adapted modules by base type name (this call and earlier ones)."""
    ranks: dict[str, int] = field(default_factory=dict)
    """Rank of every adapted module."""
    params: ParamCount = ParamCount(0, 0, 0.0)
    skipped: list[Skipped] = field(default_factory=list)
    """Modules a target rule reached that got no adapter, each with the reason."""
    saved: list[str] = field(default_factory=list)
    """``modules_to_save``: trained fully."""
    adapter: str = DEFAULT_ADAPTER
    """The adapter this call injected (and made the active, trainable one)."""

    @property
    def targets(self) -> list[str]:
        return sorted(self.ranks)


def is_bias(name: str) -> bool:
    """A parameter name of a bias (``bias``, or MultiheadAttention's ``in_proj_bias``)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf.endswith("_bias")  # MultiheadAttention's in_proj_bias


def _freeze(model: nn.Module, plan: InjectionPlan, adapter: str) -> None:
    """Only ``adapter``'s tensors, its biases and its ``modules_to_save`` train; every
    other adapter stays frozen."""
    config = plan.config
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        if adapter not in layer.lora_specs:
            continue
        for n in layer.adapter_param_names(adapter):
            getattr(layer, n).requires_grad_(True)
        bias = getattr(layer, "bias", None)
        if config.bias == "lora_only" and bias is not None:
            bias.requires_grad_(True)
    if config.bias == "all":
        for n, p in model.named_parameters():
            if is_bias(n):
                p.requires_grad_(True)
    for name in plan.saved:
        model.get_submodule(name).requires_grad_(True)


def rank_limits(module: nn.Module, lora_class: type) -> tuple[int, int]:
    """(input size, output size) of the update ``module`` gets as a ``lora_class``, from
    its adapter shapes at rank 1: nothing is allocated."""
    a_shape, b_shape = lora_class.lora_shapes(module, 1)
    return math.prod(a_shape), b_shape[0]


RANK_ALWAYS_ALLOWED = 64
"""Ranks up to this are allowed on any layer (the usual choices; on a tiny layer they cost
a few kilobytes): a model of 4-wide test layers keeps the default ``r=8``."""


def check_rank(module: nn.Module, name: str, lora_class: type, r: int) -> None:
    """The one rank rule, for ``inject_lora`` and every adapter file (checked before
    anything is allocated).

    A rank above the smaller of the layer's input and output sizes adds nothing a smaller
    one could not, but PEFT allows it (its ``all-linear`` adapters give a 3-class head
    rank 4 and more), so it is allowed with a warning naming the layer. A rank above both
    sizes and above :data:`RANK_ALWAYS_ALLOWED` is refused
    (:class:`~lora_lightning.errors.RankTooLargeError`): no adapter needs it, and from a
    file it could make us allocate any amount of memory (``r = 2**24``).
    """
    n_in, n_out = rank_limits(module, lora_class)
    limit = max(n_in, n_out, RANK_ALWAYS_ALLOWED)
    if r > limit:
        raise RankTooLargeError(name, r, limit)
    if r > min(n_in, n_out):
        warnings.warn(
            f"LoRA rank {r} for {name!r} is larger than the layer's smaller size "
            f"({min(n_in, n_out)}: input {n_in}, output {n_out}), so the update's rank is at "
            f"most {min(n_in, n_out)} and the extra rank only costs memory; allowed, as PEFT "
            "allows it.", UserWarning, stacklevel=3)


def inject_lora(model: nn.Module, config: LoRAConfig, adapter: str = DEFAULT_ADAPTER
                ) -> InjectionReport:
    """Add the LoRA adapter ``adapter`` to ``model`` in place, make it the active one and
    freeze everything else (other adapters included).

    Returns an :class:`InjectionReport`. Idempotent: calling it again with the same name
    and config changes nothing and never resets trained adapters. Another name adds a
    second set of A/B (with its own rank, alpha, targets, dropout and DoRA) to the same
    base; switch with :func:`~lora_lightning.adapters.set_adapter`. The same name with
    another config is an error (call :func:`~lora_lightning.adapters.delete_adapter`
    first). Every check runs before the first module is changed, so a refused config
    leaves the model as it was.

    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> rep = inject_lora(net, LoRAConfig(r=2, target_modules=["0"]))
    >>> rep.injected, rep.params.trainable
    (['0'], 16)
    """
    if not isinstance(config, LoRAConfig):
        raise ArgumentTypeError("inject_lora", "config", config, "a LoRAConfig")
    check_name(adapter)
    reg = model.__dict__.get(REGISTRY_ATTR)
    existing = reg.configs.get(adapter) if reg else None
    if existing is not None and existing != config:
        raise AdapterConflictError(adapter, existing, config,
            f"inject_lora: this model was already injected with a different config for "
            f"adapter {adapter!r} ({existing}); got {config}. Call unload_lora(model) or "
            "delete_adapter(model, name) first to change it, or use another adapter name."
        )
    plan = plan_injection(model, config, adapter)
    for name, planned in plan.new.items():
        check_rank(model.get_submodule(name), name, planned.lora_class, planned.r)
    merged = [n for n in plan.new if isinstance(model.get_submodule(n), LoRALayer)
              and model.get_submodule(n).merged]
    if merged:
        raise MergedLayersError(f"inject_lora: adding adapter {adapter!r}", merged)
    if config.quantize_base is not None:  # QLoRA: checked first, then each base replaced
        plan = quantize_planned(model, plan, config)
    for name, planned in plan.new.items():
        module = model.get_submodule(name)
        if not isinstance(module, LoRALayer):
            plain_head(module)  # another adapter's modules_to_save (same dtype): plain again
            module.__class__ = planned.lora_class
            module._lora_setup()
        module.add_adapter(adapter, planned.r, planned.alpha, planned.scaling, config.dropout,
                           config.init, variant_for(config), config.adapter_dtype)
    reg = model.__dict__.setdefault(REGISTRY_ATTR, AdapterRegistry())
    reg.configs[adapter] = config
    for name in plan.new:
        model.get_submodule(name).__dict__[OWNER_ATTR] = reg
    assign_heads(model, adapter, plan.saved, config.adapter_dtype)
    activate(model, [adapter])
    _freeze(model, plan, adapter)
    block_fast_paths(model)
    layers = {n: m for n, m in lora_layers(model).items() if adapter in m.lora_specs}
    return InjectionReport(
        injected=list(plan.new),
        already_injected=list(plan.existing),
        by_type=dict(Counter(type(m)._lora_base_class.__name__ for m in layers.values())),
        ranks={n: m.lora_specs[adapter].r for n, m in layers.items()},
        params=count_parameters(model),
        skipped=plan.skipped,
        saved=plan.saved,
        adapter=adapter,
    )
