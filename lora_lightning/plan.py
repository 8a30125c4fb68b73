"""Resolve a ``LoRAConfig`` against a model, once, into an injection plan.

The plan says, for every module, whether it gets an adapter (with which layer type, rank,
alpha and scale), already has one, is trained fully (``modules_to_save``), or was left out
and why. Injection, freezing and the report all read the plan; nothing re-matches names.

Matching is strict: every entry of a list field (``target_modules``, ``exclude_modules``,
``modules_to_save``), a regex ``exclude_modules``, and every ``rank_pattern``/
``alpha_pattern`` key must match at least one module, or a :class:`TargetMatchError`
names the entry and the nearest real names. A misspelled entry is never silently ignored.

The ``"all-linear"`` rule: every module whose LoRA type says ``all_linear`` (``nn.Linear``
or a subclass that keeps ``Linear.forward``, HF ``Conv1D``, ``nn.MultiheadAttention``),
except modules inside an output head: the model's ``get_output_embeddings()``, any module
whose own name is one of :data:`HEAD_NAMES`, and ``modules_to_save``, each with everything
below it.

What a module type can carry is asked of its LoRA type (``layers.base`` describes the
contract): whether a module qualifies, and which children are adapted with it
(``companions``, as MultiheadAttention's ``out_proj``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from torch import nn

from .config import ALL_LINEAR, LoRAConfig, entry_matches, name_matches, pattern_key_matches
from .errors import AdapterConflictError, TargetMatchError, UnsupportedModuleError
from .heads import SavedModule
from .layers import DEFAULT_ADAPTER, LoRALayer, lora_type_for, registered_type
from .layers.base import type_name
from .registry import canonical_name

HEAD_NAMES = ("lm_head", "classifier", "score", "head", "output_layer")
"""Module names that ``"all-linear"`` treats as output heads (with their children)."""


@dataclass(frozen=True)
class PlannedLayer:
    """One module that gets (or has) an adapter."""

    name: str
    kind: str
    """The base type's name: ``"Linear"``, ``"Conv2d"``, ``"MultiheadAttention"`` ..."""
    lora_class: type
    r: int
    alpha: float
    scaling: float


@dataclass(frozen=True)
class Skipped:
    """A module that a target rule reached but that gets no adapter, and why."""

    name: str
    kind: str
    reason: str


@dataclass
class InjectionPlan:
    config: LoRAConfig
    adapter: str = DEFAULT_ADAPTER
    new: dict[str, PlannedLayer] = field(default_factory=dict)
    """Modules that get this adapter now (plain modules, or LoRA layers with others)."""
    existing: dict[str, PlannedLayer] = field(default_factory=dict)
    """Modules that already carry this adapter with these settings (left untouched)."""
    saved: list[str] = field(default_factory=list)
    """``modules_to_save``: trained fully (the top-most matching modules)."""
    skipped: list[Skipped] = field(default_factory=list)


def _nearest(entry: str, names: list[str], limit: int = 5) -> list[str]:
    leaves = {n.rsplit(".", 1)[-1]: n for n in names}
    close = difflib.get_close_matches(entry, list(leaves), n=limit, cutoff=0.5)
    close += difflib.get_close_matches(entry, names, n=limit, cutoff=0.5)
    out = list(dict.fromkeys(close))
    return out[:limit] if out else sorted({n.rsplit(".", 1)[-1] for n in names})[:limit]


def _no_match(field_name: str, value, entry: str, names: list[str], what: str):
    near = _nearest(entry, names)
    return TargetMatchError(
        field_name, value, entry, near,
        f"{what} {entry!r} matches no module"
        f"; nearest module names: {near}. Every entry must name a real module (an exact "
        "name or a dotted suffix)",
    )


def _check_entries(config: LoRAConfig, names: list[str]) -> None:
    """Every list entry, and a regex ``exclude_modules``, must match some module."""
    fields = {"target_modules": config.target_modules, "exclude_modules": config.exclude_modules,
              "modules_to_save": config.modules_to_save}
    for field_name, spec in fields.items():
        if spec is None or spec == ALL_LINEAR:
            continue
        if isinstance(spec, str):
            if field_name == "exclude_modules" and not any(
                    name_matches(canonical_name(n), spec, field_name) for n in names):
                raise _no_match(field_name, spec, spec, names, "regex")
            continue
        unmatched = [e for e in spec if not any(entry_matches(e, canonical_name(n)) for n in names)]
        if field_name == "target_modules" and len(unmatched) == len(spec):
            continue  # nothing matches at all: the whole-field error lists the candidates
        if unmatched:
            raise _no_match(field_name, spec, unmatched[0], names, "entry")


def _inside(name: str, roots: set[str]) -> str | None:
    """The root in ``roots`` that is ``name`` or one of its ancestors, if any."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in roots:
            return prefix
    return None


def _heads(model: nn.Module, saved: set[str]) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    heads = set(saved)
    for name, m in model.named_modules():
        if name and ((out is not None and m is out) or name.rsplit(".", 1)[-1] in HEAD_NAMES):
            heads.add(name)
    return heads


def _companion_of(name: str, module: nn.Module, parent: nn.Module | None) -> str | None:
    """The child name under which ``parent``'s LoRA type adapts ``module`` with it, if any."""
    if parent is None:
        return None
    cls = registered_type(type(parent))
    if cls is None:
        return None
    child = name.rpartition(".")[2]
    own = cls.companions(parent)
    return child if own.get(child) is module else None


def _linear_like(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    if _companion_of(name, module, parent) is not None:
        return False  # adapted as part of its parent
    cls = registered_type(type(module))
    return cls is not None and cls.all_linear


def _layer_type(name: str, module: nn.Module, parent: nn.Module | None,
                config: LoRAConfig) -> type | str:
    """The LoRA class for ``module``, or the reason it cannot carry an adapter."""
    if _companion_of(name, module, parent) is not None and not isinstance(module, LoRALayer):
        parent_name = name.rpartition(".")[0]
        kind = parent._lora_base_class if isinstance(parent, LoRALayer) else type(parent)
        return (f"is the {name.rpartition('.')[2]} of the nn.{kind.__name__} {parent_name!r}, "
                "which reads its weight directly and never calls it; target the "
                f"{kind.__name__} module itself (it adapts both)")
    if isinstance(module, SavedModule) and module.saved_dtype() != module._saved_base_dtype:
        return (f"is another adapter's modules_to_save, kept in "
                f"{str(module.saved_dtype()).removeprefix('torch.')} on a "
                f"{str(module._saved_base_dtype).removeprefix('torch.')} base "
                "(LoRAConfig.adapter_dtype), and a LoRA layer computes in its base weight's "
                "dtype; give the adapter that saves it adapter_dtype='base', or add it to "
                "exclude_modules")
    return lora_type_for(module, config)


def _unsupported(name: str, module: nn.Module, reason: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(name, type_name(type(module)), reason)


def plan_injection(model: nn.Module, config: LoRAConfig, adapter: str = DEFAULT_ADAPTER
                   ) -> InjectionPlan:
    """Resolve ``config`` for ``adapter`` against ``model``; raise before anything is
    changed if it does not fit (an entry that matches nothing, an unsupported explicit
    target)."""
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    _check_entries(config, names)
    plan = InjectionPlan(config, adapter)
    saved_all = {n for n in names if name_matches(canonical_name(n), config.modules_to_save, "modules_to_save")}
    plan.saved = sorted(n for n in saved_all if _inside(n.rpartition(".")[0], saved_all) is None)
    all_linear = config.target_modules == ALL_LINEAR
    heads = _heads(model, saved_all) if all_linear else set(saved_all)
    for name in names:
        module = modules[name]
        parent_name = name.rpartition(".")[0]
        parent = modules[parent_name]
        if (parent_name in plan.new or parent_name in plan.existing) and _companion_of(
                name, module, parent) is not None:
            continue  # planned with its parent, below
        if all_linear:
            if not _linear_like(name, module, parent):
                continue
        elif not name_matches(canonical_name(name), config.target_modules):
            continue
        kind = (module._lora_base_class if isinstance(module, LoRALayer) else type(module))
        if name_matches(canonical_name(name), config.exclude_modules, "exclude_modules"):
            plan.skipped.append(Skipped(name, kind.__name__, "matches exclude_modules"))
            continue
        head = _inside(name, heads)
        if head is not None:
            why = ("in modules_to_save" if head in saved_all else "an output head")
            plan.skipped.append(Skipped(name, kind.__name__, f"inside {head!r} ({why})"))
            continue
        if isinstance(module, LoRALayer) and adapter in module.lora_specs:
            _check_existing(name, module, config, adapter)
            plan.existing[name] = _planned(name, kind, type(module), config)
            continue
        cls = _layer_type(name, module, parent, config)
        if isinstance(cls, str):
            if all_linear:
                plan.skipped.append(Skipped(name, kind.__name__, cls))
                continue
            raise _unsupported(name, module, cls)
        plan.new[name] = planned = _planned(name, kind, cls, config)
        for child, companion in cls.companions(module).items():
            # Adapted with its parent, with the same rank and alpha.
            sub = f"{name}.{child}"
            sub_cls = lora_type_for(companion, config)
            if isinstance(sub_cls, str):
                raise _unsupported(sub, companion, sub_cls)
            plan.new[sub] = PlannedLayer(sub, type(companion).__name__, sub_cls, planned.r,
                                         planned.alpha, planned.scaling)
    if not plan.new and not plan.existing:
        raise _nothing_matched(model, config, plan)
    _check_pattern_keys(config, names)
    return plan


def _planned(name: str, kind: type, cls: type, config: LoRAConfig) -> PlannedLayer:
    r, alpha = config.rank_for(canonical_name(name)), config.alpha_for(canonical_name(name))
    return PlannedLayer(name, kind.__name__, cls, r, alpha, config.scaling_for(r, alpha))


def _check_existing(name: str, module: LoRALayer, config: LoRAConfig, adapter: str) -> None:
    want = (config.rank_for(canonical_name(name)), config.alpha_for(canonical_name(name)),
            config.use_dora)
    spec = module.lora_specs[adapter]
    if (spec.r, spec.alpha, spec.use_dora) != want:
        raise AdapterConflictError(adapter, spec, config,
            f"inject_lora: module {name!r} already has an adapter with r={spec.r}, "
            f"alpha={spec.alpha:g}, dora={spec.use_dora}; the config asks for "
            f"r={want[0]}, alpha={want[1]:g}, dora={want[2]}. Call unload_lora(model) first "
            f"to change it (the adapter is {adapter!r})."
        )


def _check_pattern_keys(config: LoRAConfig, names: list[str]) -> None:
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field_name)
        for key in patterns:
            if not any(pattern_key_matches(key, canonical_name(n), field_name) for n in names):
                raise _no_match(field_name, patterns, key, names, "key")


def candidates(model: nn.Module, config: LoRAConfig, limit: int = 20) -> list[str]:
    """Modules that could carry an adapter, as ``"name (Type)"``, for error messages."""
    modules = dict(model.named_modules())
    found = [f"{n} ({type(m).__name__})" for n, m in modules.items()
             if n and not isinstance(_layer_type(n, m, modules[n.rpartition('.')[0]],
                                                 config), str)]
    more = [f"... and {len(found) - limit} more"] if len(found) > limit else []
    return found[:limit] + more


def _nothing_matched(model: nn.Module, config: LoRAConfig, plan: InjectionPlan):
    skipped = "; ".join(f"{s.name}: {s.reason}" for s in plan.skipped[:5])
    found = candidates(model, config)
    return TargetMatchError(
        "target_modules", config.target_modules, str(config.target_modules), found,
        "which matches no module of a supported type"
        + (f" (skipped: {skipped})" if skipped else "")
        + f"; candidates: {found}",
    )
