"""Training-checkpoint metadata, and turning a full state dict into an adapter-only one and
back (strip the frozen base weights on save, refill them from the model on load)."""

from __future__ import annotations

from torch import Tensor, nn

from .adapter_state import adapter_keys
from .fingerprint import base_fingerprint
from .registry import lora_layers

META_KEY = "lora_lightning"
META_VERSION = 1
SAVE_MODES = ("adapter", "full")


def _classify_keys(model: nn.Module) -> tuple[set[str], set[str]]:
    """(trained keys, frozen parameter keys) of ``model.state_dict()``; the rest are buffers."""
    trained = set(adapter_keys(model))
    frozen = {
        k for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, nn.Parameter) and k not in trained
    }
    return trained, frozen


def checkpoint_meta(model: nn.Module, config, mode: str) -> dict[str, object]:
    """Metadata stored beside a LoRA training checkpoint's state dict."""
    if mode not in SAVE_MODES:
        raise ValueError(f"checkpoint mode: got {mode!r}; expected one of {list(SAVE_MODES)}.")
    layers = lora_layers(model)
    return {
        "version": META_VERSION,
        "mode": mode,
        "config": config.to_dict(),
        "injected": sorted(layers),
        "ranks": {n: m.r for n, m in layers.items()},
        "fingerprint": base_fingerprint(model),
    }


def strip_to_adapter(model: nn.Module, state_dict: dict[str, Tensor]) -> int:
    """Drop the frozen base parameters from ``state_dict`` in place; keep trained tensors
    and every buffer (training may change any buffer, BatchNorm statistics for example).
    Returns how many keys were dropped."""
    _, frozen = _classify_keys(model)
    dropped = [k for k in state_dict if k in frozen]
    for k in dropped:
        del state_dict[k]
    return len(dropped)


def fill_base_keys(model: nn.Module, state_dict: dict[str, Tensor]) -> int:
    """Add the model's own frozen base parameters to an adapter-only ``state_dict``.

    Only frozen *parameters* are filled; a missing trained tensor or buffer stays missing,
    so a strict load still reports it. Returns how many keys were added.
    """
    _, frozen = _classify_keys(model)
    current = model.state_dict()
    added = [k for k in frozen if k not in state_dict]
    for k in added:
        state_dict[k] = current[k]
    return len(added)
