"""Training-checkpoint metadata, and turning a full state dict into an adapter-only one and
back (strip the frozen base weights on save, refill them from the model on load)."""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ArgumentError
from ..registry import canonical_name, derived_keys, lora_layers
from .adapter_state import adapter_keys
from .fingerprint import base_fingerprint

META_KEY = "lora_lightning"
META_VERSION = 1
SAVE_MODES = ("adapter", "full")


def _classify_keys(model: nn.Module, adapter: str | None = None) -> tuple[set[str], set[str]]:
    """(trained keys, frozen parameter keys) of ``model.state_dict()``; the rest are buffers.

    With an ``adapter`` name, the other adapters' tensors count as frozen base weights."""
    trained = set(adapter_keys(model, adapter))
    frozen = {
        k for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, nn.Parameter) and k not in trained
    }
    return trained, frozen


def frozen_keys(model: nn.Module, adapter: str | None = None) -> set[str]:
    """The frozen base's keys: what an adapter-only checkpoint leaves out (the frozen
    parameters, and a quantized base's quantization state, :func:`derived_keys`)."""
    return _classify_keys(model, adapter)[1] | derived_keys(model)


def checkpoint_meta(model: nn.Module, config, mode: str, adapter: str | None = None
                    ) -> dict[str, object]:
    """Metadata stored beside a LoRA training checkpoint's state dict (of one named
    adapter, or of the model's adapters when ``adapter`` is ``None``)."""
    if mode not in SAVE_MODES:
        raise ArgumentError("checkpoint_meta", "mode", mode, f"expected one of {list(SAVE_MODES)}")
    layers = adapter_layers(model, adapter)
    return {
        "version": META_VERSION,
        "mode": mode,
        "adapter": adapter,
        "config": config.to_dict(),
        "injected": sorted(layers),
        "ranks": {n: r for n, r in layers.items()},
        "fingerprint": base_fingerprint(model, adapter),
    }


def adapter_layers(model: nn.Module, adapter: str | None) -> dict[str, int]:
    """Layer name (as in the plain model) -> rank, of ``adapter`` (``None``: every LoRA
    layer, its active rank)."""
    layers = {canonical_name(n): m for n, m in lora_layers(model).items()}
    if adapter is None:
        return {n: m.r for n, m in layers.items()}
    return {n: m.lora_specs[adapter].r for n, m in layers.items() if adapter in m.lora_specs}


def strip_to_adapter(model: nn.Module, state_dict: dict[str, Tensor],
                     adapter: str | None = None) -> int:
    """Drop the frozen base (:func:`frozen_keys`) from ``state_dict`` in place; keep
    trained tensors and every buffer (training may change any buffer, BatchNorm statistics
    for example). Returns how many keys were dropped."""
    frozen = frozen_keys(model, adapter)
    dropped = [k for k in state_dict if k in frozen]
    for k in dropped:
        del state_dict[k]
    return len(dropped)


def drop_derived_keys(model: nn.Module, state_dict: dict[str, Tensor]) -> int:
    """Drop a quantized base's quantization state (:func:`derived_keys`) from a full
    checkpoint's ``state_dict``: torch's strict load refuses it, and quantizing the same
    base again rebuilds it. Returns how many keys were dropped."""
    dropped = [k for k in derived_keys(model) if k in state_dict]
    for k in dropped:
        del state_dict[k]
    return len(dropped)


def fill_base_keys(model: nn.Module, state_dict: dict[str, Tensor],
                   adapter: str | None = None) -> int:
    """Add the model's own frozen base parameters to an adapter-only ``state_dict``.

    Only frozen *parameters* are filled (not a quantized base's quantization state, which
    the model keeps and torch's load refuses); a missing trained tensor or buffer stays
    missing, so a strict load still reports it. Returns how many keys were added.
    """
    _, frozen = _classify_keys(model, adapter)
    current = model.state_dict()
    added = [k for k in frozen if k not in state_dict]
    for k in added:
        state_dict[k] = current[k]
    return len(added)
