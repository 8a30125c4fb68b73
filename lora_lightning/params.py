"""Parameter counts and sizes: the one place that counts (shared tensors counted once)."""

from __future__ import annotations

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


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameters of ``model``, each shared tensor counted once.

    >>> count_parameters(nn.Linear(3, 2))
    ParamCount(trainable=8, total=8, ratio=1.0)
    """
    trainable = total = 0
    for p in _unique(model):
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return ParamCount(trainable, total, trainable / total if total else 0.0)


def trainable_megabytes(model: nn.Module) -> float:
    """Size of the trainable tensors in MB (what an adapter-only checkpoint stores)."""
    return sum(p.numel() * p.element_size() for p in _unique(model) if p.requires_grad) / 1e6
