"""Which adapters a model holds: the one record ``inject_lora`` keeps on the model.

The record (:class:`AdapterRegistry`, stored on the module passed to ``inject_lora``)
holds each adapter's :class:`~lora_lightning.config.LoRAConfig`, the names of the active
adapters, and each adapter's own copies of its ``modules_to_save`` (a classifier head per
task). Layers hold their own adapter tensors; this record holds what spans the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import LoRAConfig
from .errors import ConfigError
from .layers import is_quantized_linear
from .layers.base import ADAPTER_NAME, DEFAULT_ADAPTER, LoRALayer

REGISTRY_ATTR = "_lora_registry"
OWNER_ATTR = "_lora_owner_registry"
"""Each LoRA layer also points at its registry, so a submodule (an HF model inside a
LightningModule) finds the record of the module LoRA was injected into."""


class AdapterNameError(ConfigError):
    """An adapter name that does not exist (or is not a valid name).

    Attributes:
        name: the name received.
        existing: the adapters the model holds.
    """

    owner = "adapter"

    def __init__(self, name: object, existing: list[str], allowed: str) -> None:
        self.name, self.existing = name, list(existing)
        super().__init__("name", name, allowed)


@dataclass
class AdapterRegistry:
    configs: dict[str, LoRAConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    heads: dict[str, dict[str, nn.Module]] = field(default_factory=dict)
    """adapter -> module name -> that adapter's copy of a ``modules_to_save`` module."""
    pristine: dict[str, nn.Module] = field(default_factory=dict)
    """module name -> the ``modules_to_save`` module as it was before any adapter."""


def find_registry(model: nn.Module) -> AdapterRegistry | None:
    """The registry on ``model`` or on the first submodule that has one; else the one its
    LoRA layers point at (``model`` is a submodule of the module LoRA was injected into)."""
    owner = None
    for m in model.modules():
        reg = m.__dict__.get(REGISTRY_ATTR)
        if reg is not None:
            return reg
        owner = owner or m.__dict__.get(OWNER_ATTR)
    return owner


def registry_for(model: nn.Module) -> AdapterRegistry:
    """``model``'s registry, created on first use."""
    reg = find_registry(model)
    if reg is None:
        reg = model.__dict__[REGISTRY_ATTR] = AdapterRegistry()
    return reg


def check_name(name: object) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise AdapterNameError(name, [], "expected letters, digits and underscores "
                               f"(for example {DEFAULT_ADAPTER!r} or 'sentiment')")
    return name


def known(model: nn.Module, name: object) -> str:
    """``name`` if the model holds that adapter, else an error listing those it holds."""
    reg = find_registry(model)
    existing = list(reg.configs) if reg else []
    if name not in existing:
        raise AdapterNameError(name, existing, f"the model holds adapters {existing}")
    return name  # type: ignore[return-value]


def find_config(model: nn.Module, adapter: str | None = None) -> LoRAConfig | None:
    """The config of ``adapter`` (default: the first active one, or the only one)."""
    reg = find_registry(model)
    if reg is None or not reg.configs:
        return None
    if adapter is None:
        adapter = next((a for a in reg.active if a in reg.configs), next(iter(reg.configs)))
    return reg.configs.get(adapter)


def current_adapter(model: nn.Module) -> str:
    """The adapter that single-adapter operations act on: the first active one."""
    reg = find_registry(model)
    if reg is None or not reg.configs:
        return DEFAULT_ADAPTER
    return next((a for a in reg.active if a in reg.configs), next(iter(reg.configs)))


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer in ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod")
"""Name segments that wrappers add (activation checkpointing, FSDP, ``torch.compile``)."""


def canonical_name(name: str) -> str:
    """``name`` without wrapper segments: the name in the plain, unwrapped model. Files hold
    these, so a checkpoint of a wrapped model loads into a plain one and back."""
    if not any(seg in name for seg in WRAPPER_SEGMENTS):
        return name
    return ".".join(p for p in name.split(".") if p not in WRAPPER_SEGMENTS)


def state_keys(model: nn.Module) -> dict[int, str]:
    """id of each tensor -> its key in ``model.state_dict()``. Wrappers differ in what they
    keep of their segments there (activation checkpointing drops its own, ``torch.compile``
    keeps ``_orig_mod``), so keys are found by identity, not by name."""
    return {id(t): k for k, t in model.state_dict(keep_vars=True).items()}


def param_keys(model: nn.Module) -> dict[str, str]:
    """``named_parameters`` name -> state-dict key, for every parameter in the state dict."""
    by_id = state_keys(model)
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def derived_keys(model: nn.Module) -> set[str]:
    """State-dict keys that are neither parameters nor buffers: the quantization state that
    bitsandbytes' linears write beside their packed weight (``weight.absmax``,
    ``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``,
    ``SCB``, ``weight_format``). They are part of the frozen base: derived from the weight,
    rebuilt when the base is quantized again, never in an adapter-only checkpoint."""
    by_id = state_keys(model)
    out: set[str] = set()
    for m in model.modules():
        key = by_id.get(id(getattr(m, "weight", None))) if is_quantized_linear(m) else None
        if key is None:
            continue
        prefix = key[: -len("weight")]
        local: dict[str, Any] = {}
        m._save_to_state_dict(local, prefix, keep_vars=True)
        out |= set(local) - {prefix + n for n in (*m._parameters, *m._buffers)}
    return out


def to_model_keys(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` (a file's state dict, keyed by plain names) keyed as ``model.state_dict()``
    is: each key that names one of the model's tensors under its wrapper segments, the
    others unchanged."""
    mine = {canonical_name(k): k for k in model.state_dict(keep_vars=True)}
    return {mine.get(canonical_name(k), k): v for k, v in state.items()}


def lora_param_keys(model: nn.Module, adapter: str | None = None) -> set[str]:
    """State-dict keys of the adapter tensors (``lora_A``, ``lora_B``, ``lora_magnitude``)
    of one adapter, or of every adapter when ``adapter`` is ``None``."""
    by_id = state_keys(model)
    out = set()
    for name, layer in lora_layers(model).items():
        if adapter is not None and adapter not in layer.lora_specs:
            continue
        for p in layer.adapter_param_names(adapter):
            out.add(by_id.get(id(getattr(layer, p)), f"{name}.{p}"))
    return out


def swap_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name`` in ``model`` (on the device of what it replaces)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    current = getattr(parent, child)
    if current is module:
        return
    ref = next(current.parameters(), None)
    if ref is not None:
        module.to(ref.device)
    setattr(parent, child, module)
