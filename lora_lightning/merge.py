"""Merge, unmerge, unload and temporarily disable adapters.

Merging folds ``scale·B·A`` into ``W`` so inference costs nothing extra; it is always an
explicit call, never a side effect of ``train()``/``eval()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from .inject import CONFIG_ATTR, lora_layers, lora_param_keys
from .layers import LoRALayer


def merge_lora(model: nn.Module) -> int:
    """Merge every adapter into its base weight. Returns how many layers were merged."""
    layers = [m for m in lora_layers(model).values() if not m.merged]
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora`. Returns how many layers were unmerged."""
    layers = [m for m in lora_layers(model).values() if m.merged]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A plain state dict with the adapters folded in, for the un-injected model class.

    The model itself is not modified. The result loads with ``strict=True`` into a fresh
    instance of the original model and computes the same outputs.
    """
    layers = lora_layers(model)
    adapter_keys = lora_param_keys(model)
    merged = {f"{name}.weight": layer.merged_weight() for name, layer in layers.items()}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key in adapter_keys:
            continue
        out[key] = merged.get(key, value)
    return out


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every adapter and restore the original module types, in place.

    With ``merge=True`` (the default) the adapters are folded into the weights first;
    with ``merge=False`` they are discarded and the base weights restored. Parameters keep
    their ``requires_grad`` flags. Returns ``model``.
    """
    for layer in lora_layers(model).values():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        base = layer._lora_base_class
        layer._lora_teardown()
        layer.__class__ = base
    model.__dict__.pop(CONFIG_ATTR, None)
    for m in model.modules():
        m.__dict__.pop(CONFIG_ATTR, None)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block; adapters come back on exit.

    Merged layers are unmerged for the block and merged again after it. Modules in
    ``modules_to_save`` have no separate base copy and keep their trained weights.
    """
    layers: list[LoRALayer] = list(lora_layers(model).values())
    remerge = [m for m in layers if m.merged]
    for m in remerge:
        m.unmerge()
    previous = [m.lora_disabled for m in layers]
    for m in layers:
        m.lora_disabled = True
    try:
        yield model
    finally:
        for m, prev in zip(layers, previous, strict=True):
            m.lora_disabled = prev
        for m in remerge:
            m.merge()
