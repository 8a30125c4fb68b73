"""Parameter counts and sizes: the one place that counts (shared tensors counted once)."""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import nn


class ParamCount(NamedTuple):
    """Trainable and total parameter counts (shared tensors counted once)."""

    trainable: int
    total: int
    ratio: float


def _unique(model: nn.Module):
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _numel(p: nn.Parameter) -> int:
    """How many weights ``p`` holds: a bitsandbytes 4-bit weight packs two per byte, and its
    quantization state knows the dense shape."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameters of ``model``, each shared tensor counted once (a
    4-bit weight as the dense weight it stands for).

    >>> count_parameters(nn.Linear(3, 2))
    ParamCount(trainable=8, total=8, ratio=1.0)
    """
    trainable = total = 0
    for p in _unique(model):
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return ParamCount(trainable, total, trainable / total if total else 0.0)


def trainable_megabytes(model: nn.Module) -> float:
    """Size of the trainable tensors in MB (what an adapter-only checkpoint stores)."""
    return sum(p.numel() * p.element_size() for p in _unique(model) if p.requires_grad) / 1e6
