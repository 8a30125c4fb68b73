"""Adapter state dicts: the trained tensors of a LoRA model, extracted and loaded strictly."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .errors import AdapterLoadError
from .registry import lora_layers, lora_param_keys


def adapter_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the trained tensors: adapters, plus trainable biases and
    ``modules_to_save`` parameters (whatever ``inject_lora`` left trainable)."""
    keys = lora_param_keys(model)
    keys.update(n for n, p in model.named_parameters() if p.requires_grad)
    return sorted(keys)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the trained tensors of ``model``, keyed as in ``model.state_dict()``."""
    if not lora_layers(model):
        raise ValueError(
            "adapter_state_dict: the model has no LoRA layers; call inject_lora(model, config) "
            "first."
        )
    keys = set(adapter_keys(model))
    return {k: v for k, v in model.state_dict(keep_vars=False).items() if k in keys}


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load an adapter state dict strictly: every key, no extras, matching shapes.

    Everything is checked before any tensor is written, so a failed load leaves the model
    exactly as it was. Merged layers are unmerged, updated and merged again.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"load_adapter_state_dict: expected a mapping of tensors, got "
            f"{type(state_dict).__name__}."
        )
    expected = set(adapter_keys(model))
    if not expected:
        raise AdapterLoadError(
            "load_adapter_state_dict: the model has no LoRA layers or trainable tensors; "
            "call inject_lora(model, config) first."
        )
    targets = model.state_dict(keep_vars=True)
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    problems = []
    if missing:
        problems.append(f"missing adapter keys {preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {preview(unexpected)}")
    for key in sorted(expected & set(state_dict)):
        value = state_dict[key]
        if not isinstance(value, Tensor):
            problems.append(f"{key!r} is a {type(value).__name__}, not a tensor")
        elif value.shape != targets[key].shape:
            problems.append(
                f"shape mismatch for {key!r}: checkpoint has {tuple(value.shape)}, model has "
                f"{tuple(targets[key].shape)}"
            )
    if problems:
        raise AdapterLoadError(
            "load_adapter_state_dict: the adapter does not fit this model: "
            + "; ".join(problems)
            + ". Inject with the same LoRAConfig (rank, targets, bias, modules_to_save) "
            "that produced the adapter."
        )
    merged = [m for m in lora_layers(model).values() if m.merged]
    for m in merged:
        m.unmerge()
    with torch.no_grad():
        for key in expected:
            targets[key].copy_(state_dict[key])
    for m in merged:
        m.merge()


def preview(keys: list[str], limit: int = 10) -> str:
    shown = keys[:limit]
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{shown}{more}"
