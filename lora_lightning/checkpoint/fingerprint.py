"""A cheap fingerprint of a model's frozen base weights, to tell base models apart."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..registry import canonical_name, param_keys
from .adapter_state import adapter_keys


def base_fingerprint(model: nn.Module, adapter: str | None = None) -> dict[str, object]:
    """Shapes plus a cheap content hash of the frozen base parameters (not buffers,
    which training may change).

    Reads at most 4,096 evenly spaced values per tensor, so it costs milliseconds even
    for large models. Take it while the adapters are not merged.
    """
    excluded = set(adapter_keys(model, adapter))  # other adapters count as base here
    digest = hashlib.sha256()
    n = 0
    names = param_keys(model)
    for name, value in model.named_parameters():
        key = names.get(name, name)
        if key in excluded:
            continue
        key = canonical_name(key)  # a wrapped model and its plain form agree
        flat = value.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(torch.float64).cpu()
        digest.update(f"{key}:{tuple(value.shape)}:".encode())
        digest.update(f"{sample.sum().item():.6e}:{sample.abs().sum().item():.6e}".encode())
        n += 1
    return {"tensors": n, "sha256": digest.hexdigest()}
