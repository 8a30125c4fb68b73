"""Many adapters on one base: list, switch, delete, and run a different adapter per sample.

Switching (:func:`set_adapter`) assigns each layer's list of active adapter names and puts
each active adapter's own ``modules_to_save`` copies (its heads) in place: no weight is
copied, so it costs the same for any base size. Every check runs before the first change,
so a refused switch leaves every layer as it was.

:func:`per_sample_adapters` runs one forward pass in which each sample of the batch uses its
own adapter (or none: exactly the base output), as for serving many users' adapters at
once. Each layer type decides how (``LoRALayer._per_sample``): matmul layers gather each
sample's stacked adapter and apply all of them with two batched matmuls; the others group
the samples by adapter, one ``index_select``/``index_add`` per adapter, never per sample.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .errors import MergedLayersError, PerSampleBatchError, PerSampleError
from .heads import as_saved, saved_dtype_for
from .layers import unblock_fast_paths
from .registry import (
    REGISTRY_ATTR,
    AdapterNameError,
    AdapterRegistry,
    find_registry,
    known,
    lora_layers,
    swap_module,
)

BASE = None
"""In :func:`per_sample_adapters`, the name for a sample that uses no adapter."""


def list_adapters(model: nn.Module) -> list[str]:
    """The adapters ``model`` holds, in the order they were added."""
    reg = find_registry(model)
    return list(reg.configs) if reg else []


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters the forward applies."""
    reg = find_registry(model)
    return list(reg.active) if reg else []


def _heads_for(reg: AdapterRegistry, names: Sequence[str]) -> dict[str, nn.Module]:
    """Module name -> the module to install for ``names`` (refused if two own one)."""
    out: dict[str, nn.Module] = {}
    for head in {h for heads in reg.heads.values() for h in heads}:
        owners = [a for a in names if head in reg.heads.get(a, {})]
        if len(owners) > 1:
            raise AdapterNameError(list(names), list(reg.configs), (
                f"adapters {owners} each have their own {head!r} (modules_to_save), and one "
                "module can hold only one of them at a time; activate one of them"))
        if owners:
            out[head] = reg.heads[owners[0]][head]
        elif head in reg.pristine:
            out[head] = reg.pristine[head]
    return out


def activate(model: nn.Module, names: Sequence[str]) -> None:
    """Make ``names`` the active adapters (the checked core of :func:`set_adapter`)."""
    reg = find_registry(model)
    layers = lora_layers(model)
    merged = [n for n, m in layers.items() if m.merged]
    if merged and any(set(m.lora_active) != set(names) & set(m.lora_specs)
                      for m in layers.values()):
        raise MergedLayersError(f"switching adapters to {list(names)}", merged)
    heads = _heads_for(reg, names)
    for layer in layers.values():
        layer.lora_active = [n for n in names if n in layer.lora_specs]
    for head, module in heads.items():
        swap_module(model, head, module)
    reg.active = list(names)


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Choose the active adapter(s): one name, or a list whose updates add up.

    Raises an error listing the adapters that exist for an unknown name, before anything
    changes. Does not change which parameters require grad (``inject_lora`` does).
    """
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        known(model, n)
    activate(model, names)


def assign_heads(model: nn.Module, adapter: str, saved: Sequence[str],
                 dtype_rule: str | None = None) -> None:
    """Give ``adapter`` its own copy of each ``modules_to_save`` module.

    The first adapter to claim a module keeps the module itself (a single-adapter model
    is unchanged); a later one gets a fresh copy of the module as it was before any
    adapter trained it. Where ``dtype_rule`` (``LoRAConfig.adapter_dtype``) gives another
    dtype than the module's (float32 on a half-precision base), the adapter gets a copy in
    that dtype (``heads.py``).
    """
    reg = find_registry(model)
    owned = reg.heads.setdefault(adapter, {})
    for name in saved:
        if name in owned:
            continue
        current = model.get_submodule(name)
        if name not in reg.pristine:
            reg.pristine[name] = copy.deepcopy(current)
        pristine = reg.pristine[name]
        taken = any(name in heads for a, heads in reg.heads.items() if a != adapter)
        copied = taken or saved_dtype_for(pristine, dtype_rule) is not None
        owned[name] = as_saved(copy.deepcopy(pristine) if copied else current, dtype_rule)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and its heads. A layer left with no adapter gets its
    original type back; a model left with none is a plain model again."""
    known(model, name)
    reg = find_registry(model)
    layers = lora_layers(model)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise MergedLayersError(f"deleting adapter {name!r}", merged)
    remaining = [a for a in reg.active if a != name]
    for layer in layers.values():
        if name in layer.lora_specs:
            layer.remove_adapter(name)
        if not layer.lora_specs:
            base = layer._lora_base_class
            layer._lora_teardown()
            layer.__class__ = base
    del reg.configs[name]
    owned = reg.heads.pop(name, {})
    for head in owned:
        if head in reg.pristine and not any(head in h for h in reg.heads.values()):
            swap_module(model, head, reg.pristine.pop(head))
    if not reg.configs:
        unblock_fast_paths(model)
        for m in model.modules():
            m.__dict__.pop(REGISTRY_ATTR, None)
        return
    activate(model, remaining)


class _PerSampleHead(nn.Module):
    """A ``modules_to_save`` module for a mixed batch: each group of samples goes through
    its own adapter's copy; samples of no group through ``fallback``."""

    def __init__(self, groups: list[tuple[nn.Module, Tensor]], fallback: nn.Module,
                 rest: Tensor | None, name: str, size: int) -> None:
        super().__init__()
        self._groups, self._fallback, self._rest = groups, fallback, rest
        self._name, self._size = name, size

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        _check_batch(x, self._size, self._name)
        parts = [(m, idx) for m, idx in self._groups]
        if self._rest is not None:
            parts.append((self._fallback, self._rest))
        out = None
        for module, idx in parts:
            y = module(x.index_select(0, idx), *args, **kwargs)
            if out is None:
                out = y.new_zeros((x.shape[0], *y.shape[1:]))
            out = out.index_copy(0, idx, y)
        return out


def _check_batch(x: object, size: int, name: str) -> None:
    if isinstance(x, Tensor) and x.dim() and x.shape[0] != size:
        raise PerSampleBatchError(size, x.shape[0], name)


class _BatchCheck:
    """A forward pre-hook: the layer's input must hold one sample per adapter name (a
    shorter list would leave the rest with the base output, a longer one fail inside)."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        _check_batch(args[0] if args else next(iter(kwargs.values()), None), self.size,
                     self.name)


@contextmanager
def per_sample_adapters(model: nn.Module, adapter_names: Sequence[str | None]
                        ) -> Iterator[nn.Module]:
    """Inside the block, sample ``i`` of each batch uses adapter ``adapter_names[i]``
    (``None``: the base model alone; batch dimension first).

    Layers must not be merged; a layer type that applies its adapter as a weight update
    (``nn.MultiheadAttention``) refuses with :class:`~lora_lightning.errors.PerSampleError`.
    A batch whose size is not ``len(adapter_names)`` is refused at the first adapted layer
    (:class:`~lora_lightning.errors.PerSampleBatchError`, naming both).
    """
    names = list(adapter_names)
    for n in {n for n in names if n is not BASE}:
        known(model, n)
    reg = find_registry(model)
    layers = lora_layers(model)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise MergedLayersError("per_sample_adapters", merged)
    used = sorted({n for n in names if n is not BASE})
    whole = [n for n, m in layers.items() if not m.supports_per_sample
             and set(used) & set(m.lora_specs)]
    if whole:
        raise PerSampleError(layers[whole[0]]._lora_base_class.__name__, whole[0])
    device = next(model.parameters()).device
    groups = {n: torch.tensor([i for i, m in enumerate(names) if m == n], device=device)
              for n in used}
    installed: dict[str, nn.Module] = {}
    # Every head some adapter owns, not only the used adapters' ones: a sample marked None
    # (or one whose adapter has no copy of a head) gets the head as it was before any
    # adapter, also when no sample of the batch names an adapter (issue 22).
    for head in sorted({h for heads in (reg.heads.values() if reg else ()) for h in heads}):
        current = model.get_submodule(head)
        owned = [(reg.heads[a][head], groups[a]) for a in used if head in reg.heads.get(a, {})]
        owners = {a for a in used if head in reg.heads.get(a, {})}
        rest = [i for i, m in enumerate(names) if m not in owners]
        fallback = reg.pristine.get(head, current)
        installed[head] = current
        rest_idx = torch.tensor(rest, device=device) if rest else None
        swap_module(model, head, _PerSampleHead(owned, fallback, rest_idx, head, len(names)))
    checks = []
    for name, layer in layers.items():
        layer.lora_groups = [(n, idx) for n, idx in groups.items() if n in layer.lora_specs]
        checks.append(layer.register_forward_pre_hook(_BatchCheck(name, len(names)),
                                                      with_kwargs=True))
    try:
        yield model
    finally:
        for handle in checks:
            handle.remove()
        for layer in layers.values():
            layer.lora_groups = None
        for head, module in installed.items():
            swap_module(model, head, module)
