"""The LR range test on the raw losses: record them, pick a rate, draw the curve.

Lightning's ``Tuner.lr_find`` keeps an exponential moving average of the loss
(``beta=0.98``) and divides it by ``1 - beta ** (global_step + 1)`` to remove the
average's bias toward its zero start. At the first point ``global_step`` is already 1,
so the average of one loss is divided by ``1 - beta**2`` instead of ``1 - beta``: the
curve starts at about half the true loss (0.69 -> 0.35 for a fresh two-class head) and
climbs back over the next ~50 steps, whatever the rate does. On a 50-step test that
climb is most of the curve, and its "steepest descent" says little about the rate.

So the app records the loss of every step itself (:func:`record_losses`, around
``Tuner.lr_find``) and picks the rate from those (:func:`suggest_lr`):

1. smooth the raw losses with a centred moving average over ``window`` (5) points,
   shorter at the ends (the rates rise exponentially, so that is a fixed span of
   log-rate);
2. take the rate at the smoothed minimum, at or before the first point where the
   smoothed loss has risen above ``diverge`` (4) times the minimum so far;
3. suggest a tenth of it: the loss is lowest just before training becomes unstable, and
   a run at that rate for hundreds of steps, not one, diverges; one decade below keeps
   the fast descent without the edge.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RangeTest:
    """One range test: the rate and raw loss of each step, and what was picked."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    min_index: int | None = None
    suggestion: float | None = None


@contextmanager
def record_losses(module: Any) -> Iterator[list[float]]:
    """Collect the training loss of every batch ``module`` trains on inside the block.

    Wraps the module's own ``on_train_batch_end`` (Lightning calls the module's hook even
    while ``Tuner.lr_find`` has swapped the Trainer's callbacks for its own), and puts it
    back afterwards. A batch whose step returned no loss records NaN.
    """
    losses: list[float] = []
    original = module.on_train_batch_end  # bound method (or an instance attribute)
    had_instance_attr = "on_train_batch_end" in vars(module)

    def hook(self: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        losses.append(float(loss.detach()) if loss is not None else math.nan)
        original(outputs, batch, batch_idx)

    module.on_train_batch_end = types.MethodType(hook, module)
    try:
        yield losses
    finally:
        if had_instance_attr:
            module.on_train_batch_end = original
        else:
            del module.on_train_batch_end


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred mean over ``window`` points (odd), fewer at the ends; NaNs are skipped."""
    half = window // 2
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - half): i + half + 1] if math.isfinite(v)]
        out.append(sum(part) / len(part) if part else math.nan)
    return out


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], *, window: int = 5,
               diverge: float = 4.0, factor: float = 10.0) -> RangeTest:
    """Pick a rate from raw range-test losses (the module's docstring has the rule).

    Returns a :class:`RangeTest`; its ``suggestion`` is None when fewer than ``window``
    losses are finite.
    """
    n = min(len(lrs), len(losses))
    test = RangeTest(lrs=[float(x) for x in lrs[:n]], losses=[float(x) for x in losses[:n]])
    test.smoothed = moving_average(test.losses, window)
    if sum(math.isfinite(v) for v in test.losses) < window:
        return test
    best = None
    for i, value in enumerate(test.smoothed):
        if not math.isfinite(value):
            continue
        if best is not None and value > diverge * test.smoothed[best]:
            break
        if best is None or value < test.smoothed[best]:
            best = i
    test.min_index = best
    test.suggestion = test.lrs[best] / factor if best is not None else None
    return test


def plot(test: RangeTest, path: Any, title: str = "") -> None:
    """The raw losses, their moving average, the minimum and the suggestion, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(test.lrs, test.losses, ".", color="0.6", label="loss of each step (raw)")
    ax.plot(test.lrs, test.smoothed, "-", color="tab:blue", label="moving average, 5 steps")
    if test.losses and math.isfinite(test.losses[0]):
        ax.axhline(test.losses[0], color="0.4", linestyle=":", linewidth=1,
                   label=f"first step's loss {test.losses[0]:.3f}")
    if test.min_index is not None:
        ax.plot(test.lrs[test.min_index], test.smoothed[test.min_index], "o", color="tab:red",
                label=f"lowest average at {test.lrs[test.min_index]:.2g}")
    if test.suggestion is not None:
        ax.axvline(test.suggestion, color="tab:green", linestyle="--",
                   label=f"suggestion (a tenth) {test.suggestion:.2g}")
    ax.set_xscale("log")
    finite = [v for v in test.losses if math.isfinite(v)]
    if finite:  # a diverged tail would flatten the rest
        low, first = min(finite), finite[0]
        ax.set_ylim(low - 0.05 * abs(low), max(first, low) * 1.6)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title or "LR range test")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
