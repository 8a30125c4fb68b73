"""Target matching, injection and freezing.

``inject_lora(model, config)`` swaps each matching module's class to its LoRA type in
place (no copies, so injecting into thousands of layers is fast), then freezes everything
except the adapters, the ``modules_to_save`` and the biases that ``config.bias`` selects.
Calling it again on an injected model changes nothing: trained adapters are never reset.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from .config import ALL_LINEAR, LoRAConfig, name_matches
from .layers import LoRALayer, is_linear_like, lora_class_for, supported_type_names

CONFIG_ATTR = "_lora_config"
_HEAD_NAMES = ("lm_head", "classifier", "score", "head", "output_layer")


class ParamCount(NamedTuple):
    """Trainable and total parameter counts (shared tensors counted once)."""

    trainable: int
    total: int
    ratio: float


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

    @property
    def targets(self) -> list[str]:
        return sorted(self.ranks)


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameters of ``model``, each shared tensor counted once.

    >>> count_parameters(nn.Linear(3, 2))
    ParamCount(trainable=8, total=8, ratio=1.0)
    """
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return ParamCount(trainable, total, trainable / total if total else 0.0)


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


def _head_names(model: nn.Module, config: LoRAConfig) -> set[str]:
    """Modules that ``"all-linear"`` leaves alone: the output head and modules_to_save."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, m in model.named_modules():
        if out is not None and m is out:
            heads.add(name)
        if name.rsplit(".", 1)[-1] in _HEAD_NAMES:
            heads.add(name)
        if name_matches(name, config.modules_to_save):
            heads.add(name)
    return heads


def _is_target(name: str, module: nn.Module, config: LoRAConfig, heads: set[str]) -> bool:
    if not name or name_matches(name, config.exclude_modules):
        return False
    if config.modules_to_save and name_matches(name, config.modules_to_save):
        return False
    if config.target_modules == ALL_LINEAR:
        return is_linear_like(module) and name not in heads
    return name_matches(name, config.target_modules)


def _candidates(model: nn.Module, limit: int = 20) -> list[str]:
    names = [
        f"{n} ({type(m).__name__})" for n, m in model.named_modules()
        if n and lora_class_for(m) is not None
    ]
    return names[:limit] + ([f"... and {len(names) - limit} more"] if len(names) > limit else [])


def _check_layer(name: str, module: nn.Module, config: LoRAConfig) -> type:
    cls = lora_class_for(module)
    if cls is None:
        raise TypeError(
            f"target module {name!r} has type {type(module).__module__}."
            f"{type(module).__qualname__}, which LoRA does not support; supported types are "
            f"{supported_type_names()}. Narrow target_modules (for example to its Linear "
            "children) or add it to exclude_modules."
        )
    if getattr(module, "groups", 1) != 1:
        raise TypeError(
            f"target module {name!r} is a grouped convolution (groups={module.groups}); "
            "LoRA supports groups=1 only. Add it to exclude_modules."
        )
    if config.use_dora and isinstance(module, nn.Embedding):
        raise TypeError(
            f"target module {name!r} is an nn.Embedding, which DoRA does not support; use "
            "use_dora=False or exclude it."
        )
    return cls


def _freeze(model: nn.Module, config: LoRAConfig) -> None:
    layers = lora_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        for n in layer.adapter_param_names():
            getattr(layer, n).requires_grad_(True)
        bias = getattr(layer, "bias", None)
        if config.bias == "lora_only" and bias is not None:
            bias.requires_grad_(True)
    if config.bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)
    if config.modules_to_save:
        for name, m in model.named_modules():
            if name and name_matches(name, config.modules_to_save):
                m.requires_grad_(True)


def _check_modules_to_save(model: nn.Module, config: LoRAConfig) -> None:
    # Checked before any module is swapped, so a bad config leaves the model untouched.
    if config.modules_to_save and not any(
        name and name_matches(name, config.modules_to_save) for name, _ in model.named_modules()
    ):
        raise ValueError(
            f"LoRAConfig.modules_to_save: got {config.modules_to_save!r}, which matches no "
            f"module; candidates include {[n for n, _ in model.named_children()]}."
        )


def inject_lora(model: nn.Module, config: LoRAConfig) -> InjectionReport:
    """Add LoRA adapters to ``model`` in place and freeze the rest.

    Returns an :class:`InjectionReport`. Idempotent: modules that already carry an
    adapter are left as they are. A module already adapted with a different rank or
    alpha is an error (call :func:`unload_lora` first).

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
    heads = _head_names(model, config) if config.target_modules == ALL_LINEAR else set()
    report = InjectionReport()
    todo: list[tuple[str, nn.Module, type]] = []
    for name, module in model.named_modules():
        if not _is_target(name, module, config, heads):
            continue
        if isinstance(module, LoRALayer):
            want_r, want_alpha = config.rank_for(name), config.alpha_for(name)
            if (module.r, module.lora_alpha, module.use_dora) != (
                want_r, want_alpha, config.use_dora
            ):
                raise ValueError(
                    f"inject_lora: module {name!r} already has an adapter with r={module.r}, "
                    f"alpha={module.lora_alpha:g}, dora={module.use_dora}; the config asks for "
                    f"r={want_r}, alpha={want_alpha:g}, dora={config.use_dora}. Call "
                    "unload_lora(model) first to change it."
                )
            report.already_injected.append(name)
            continue
        if config.target_modules == ALL_LINEAR and lora_class_for(module) is None:
            continue
        todo.append((name, module, _check_layer(name, module, config)))
    if not todo and not report.already_injected:
        raise ValueError(
            f"LoRAConfig.target_modules: got {config.target_modules!r}, which matches no "
            f"module of a supported type; candidates: {_candidates(model)}."
        )
    _check_modules_to_save(model, config)
    for name, module, cls in todo:
        r, alpha = config.rank_for(name), config.alpha_for(name)
        module.__class__ = cls
        module._lora_setup(
            r, alpha, config.scaling_for(r, alpha), config.dropout, config.init, config.use_dora
        )
        report.injected.append(name)
    model.__dict__[CONFIG_ATTR] = config
    _freeze(model, config)
    layers = lora_layers(model)
    report.by_type = dict(Counter(type(m)._lora_base_class.__name__ for m in layers.values()))
    report.ranks = {n: m.r for n, m in layers.items()}
    report.params = count_parameters(model)
    return report
