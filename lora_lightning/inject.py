"""Injection and freezing, from an :class:`~lora_lightning.plan.InjectionPlan`.

``inject_lora(model, config)`` resolves the config into a plan (which module gets which
adapter, and why others were left out; see ``plan.py``), swaps each planned module's class
to its LoRA type in place (no copies, so injecting into thousands of layers is fast), then
freezes everything except the adapters, the ``modules_to_save`` and the biases that
``config.bias`` selects. Calling it again on an injected model changes nothing: trained
adapters are never reset.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from .config import LoRAConfig
from .layer_base import LoRALayer
from .layers_mha import block_fast_paths
from .params import ParamCount, count_parameters
from .plan import InjectionPlan, Skipped, plan_injection

CONFIG_ATTR = "_lora_config"


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

    @property
    def targets(self) -> list[str]:
        return sorted(self.ranks)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer in ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_param_keys(model: nn.Module) -> set[str]:
    """State-dict keys of every adapter tensor (``lora_A``, ``lora_B``, ``lora_magnitude``)."""
    return {
        f"{name}.{p}" for name, layer in lora_layers(model).items()
        for p in layer.adapter_param_names()
    }


def find_config(model: nn.Module) -> LoRAConfig | None:
    """The config ``inject_lora`` stored on ``model`` or on one of its submodules."""
    for m in model.modules():
        cfg = m.__dict__.get(CONFIG_ATTR)
        if cfg is not None:
            return cfg
    return None


def _is_bias(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf.endswith("_bias")  # MultiheadAttention's in_proj_bias


def _freeze(model: nn.Module, plan: InjectionPlan) -> None:
    config = plan.config
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        for n in layer.adapter_param_names():
            getattr(layer, n).requires_grad_(True)
        bias = getattr(layer, "bias", None)
        if config.bias == "lora_only" and bias is not None:
            bias.requires_grad_(True)
    if config.bias == "all":
        for n, p in model.named_parameters():
            if _is_bias(n):
                p.requires_grad_(True)
    for name in plan.saved:
        model.get_submodule(name).requires_grad_(True)


def inject_lora(model: nn.Module, config: LoRAConfig) -> InjectionReport:
    """Add LoRA adapters to ``model`` in place and freeze the rest.

    Returns an :class:`InjectionReport`. Idempotent: modules that already carry an
    adapter are left as they are. A module already adapted with a different rank or
    alpha is an error (call :func:`unload_lora` first). Every check runs before the first
    module is changed, so a refused config leaves the model as it was.

    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> rep = inject_lora(net, LoRAConfig(r=2, target_modules=["0"]))
    >>> rep.injected, rep.params.trainable
    (['0'], 16)
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"inject_lora: expected a LoRAConfig, got {type(config).__name__}.")
    existing = model.__dict__.get(CONFIG_ATTR)
    if existing is not None and existing != config:
        raise ValueError(
            "inject_lora: this model was already injected with a different config "
            f"({existing}); got {config}. Call unload_lora(model) first to change it."
        )
    plan = plan_injection(model, config)
    for name, planned in plan.new.items():
        module = model.get_submodule(name)
        module.__class__ = planned.lora_class
        module._lora_setup(planned.r, planned.alpha, planned.scaling, config.dropout,
                           config.init, config.use_dora)
    model.__dict__[CONFIG_ATTR] = config
    _freeze(model, plan)
    block_fast_paths(model)
    layers = lora_layers(model)
    return InjectionReport(
        injected=list(plan.new),
        already_injected=list(plan.existing),
        by_type=dict(Counter(type(m)._lora_base_class.__name__ for m in layers.values())),
        ranks={n: m.r for n, m in layers.items()},
        params=count_parameters(model),
        skipped=plan.skipped,
        saved=plan.saved,
    )
