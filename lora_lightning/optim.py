"""Optimizer parameter groups for a LoRA model: the home of per-tensor learning rates.

:func:`lora_param_groups` turns a model's trainable tensors into ``torch.optim`` parameter
groups. Without LoRA+ it is one group (exactly what ``AdamW([p for p in model.parameters()
if p.requires_grad])`` optimises). With ``LoRAConfig(loraplus_lr_ratio=k)`` (LoRA+, Hayou
et al., 2024; PEFT's ``create_loraplus_optimizer`` builds the same groups) the ``B``
factors train with ``k`` times the learning rate of everything else: ``B`` starts at zero
and feeds the output directly, and a larger step for it speeds up feature learning.

>>> import torch
>>> from torch import nn
>>> from lora_lightning import LoRAConfig, inject_lora
>>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
>>> _ = inject_lora(net, LoRAConfig(r=2, target_modules=["0"], loraplus_lr_ratio=16))
>>> [(g["name"], g["lr"], len(g["params"])) for g in lora_param_groups(net, lr=1e-3)]
[('lora', 0.001, 1), ('lora_B', 0.016, 1)]
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .errors import ArgumentError, NoAdaptersError
from .layers.base import param_names
from .registry import find_config, lora_layers


def b_factor_ids(model: nn.Module) -> set[int]:
    """ids of every adapter's ``B`` tensor."""
    return {id(getattr(layer, param_names(name)[1]))
            for layer in lora_layers(model).values() for name in layer.lora_specs}


def lora_param_groups(model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                      loraplus_lr_ratio: float | None = None,
                      adapter: str | None = None) -> list[dict[str, Any]]:
    """Parameter groups of ``model``'s trainable tensors, for any ``torch.optim`` optimizer.

    Args:
        model: a model (or LightningModule) with LoRA injected.
        lr: the learning rate of every tensor but the LoRA+ ``B`` factors.
        weight_decay: for every group.
        loraplus_lr_ratio: ``B``'s learning rate over ``lr``; default: the injected
            config's ``loraplus_lr_ratio`` (``None`` there: one group, plain LoRA).
        adapter: whose config supplies the ratio (default: the active adapter).

    Returns:
        ``[{"name": "lora", "params": [...], "lr": lr, "weight_decay": ...}]``, plus a
        ``"lora_B"`` group at ``lr * ratio`` with LoRA+. Only tensors that require grad are
        included, each once, in ``named_parameters`` order.
    """
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not (
            lr > 0 and math.isfinite(lr)):
        raise ArgumentError("lora_param_groups", "lr", lr, "expected a finite number > 0")
    if loraplus_lr_ratio is None:
        config = find_config(model, adapter)
        loraplus_lr_ratio = None if config is None else config.loraplus_lr_ratio
    elif isinstance(loraplus_lr_ratio, bool) or not isinstance(loraplus_lr_ratio, int | float) \
            or not (loraplus_lr_ratio > 0 and math.isfinite(loraplus_lr_ratio)):
        raise ArgumentError("lora_param_groups", "loraplus_lr_ratio", loraplus_lr_ratio,
                            "expected a finite number > 0 (LoRA+ uses 2 to 16), or None")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise NoAdaptersError("lora_param_groups", "trainable parameters")
    if loraplus_lr_ratio is None:
        return [{"name": "lora", "params": trainable, "lr": lr, "weight_decay": weight_decay}]
    b_ids = b_factor_ids(model)
    groups = [
        {"name": "lora", "params": [p for p in trainable if id(p) not in b_ids], "lr": lr,
         "weight_decay": weight_decay},
        {"name": "lora_B", "params": [p for p in trainable if id(p) in b_ids],
         "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]
