"""The numbers a comparison is read by, as final values that no chart smoothing can move.

TensorBoard's scalar charts smooth (0.6 by default) and clip outliers, so a curve's last
point is not the value logged: on the demo, smoothing drew full fine-tuning's lead over
LoRA at 2.5 to 3.3 points where the logged values say 1.0 to 1.4. The report therefore
also writes, for each group of runs (seeds pooled: mean ± one standard deviation):

- :func:`markdown`: one table of the :data:`METRICS` (TensorBoard's Text tab);
- :func:`bar_images`: one bar chart per metric, each value printed at its bar, full
  fine-tuning, LoRA and head-only in their own colours, counts and sizes on a log axis
  (TensorBoard's Images tab; :func:`lora_lightning.app.dashboard.add_final_values`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class Group(Protocol):
    """What is read of a report group (:class:`lora_lightning.app.report.Group`)."""

    label: str
    kind: str
    runs: list[dict[str, Any]]

    def values(self, key: str) -> list[float]: ...


@dataclass(frozen=True)
class Metric:
    key: str        # result.json key (checkpoint_mb is derived from checkpoint_bytes)
    title: str
    fmt: str        # format of one value
    log: bool = False       # a log axis (counts and sizes spanning decades)
    accuracy: bool = False  # an axis from 0 to 1, with the majority-class rate marked


METRICS: tuple[Metric, ...] = (
    Metric("test_acc", "test accuracy", ".4f", accuracy=True),
    Metric("best_val_acc", "best validation accuracy", ".4f", accuracy=True),
    Metric("final_val_acc", "final validation accuracy", ".4f", accuracy=True),
    Metric("trainable_params", "trainable parameters", ",.0f", log=True),
    Metric("checkpoint_mb", "checkpoint size (MB)", ",.2f", log=True),
    Metric("peak_tensor_mb", "peak tensor memory (MB)", ",.0f"),
    Metric("fit_seconds", "train time (s)", ",.1f"),
    Metric("train_gflops_per_step", "GFLOPs per training step", ",.1f"),
)
KIND_COLORS = {"full": "#cc3311", "lora": "#0077bb", "head_only": "#999999"}


def values(group: Group, key: str) -> list[float]:
    """One value per run of ``group`` (``checkpoint_mb`` from ``checkpoint_bytes``)."""
    if key == "checkpoint_mb":
        return [v / 1e6 for v in group.values("checkpoint_bytes")]
    return [v for v in group.values(key) if math.isfinite(v)]


def summary(group: Group, metric: Metric) -> tuple[float, float, int]:
    """(mean, standard deviation, number of runs); nan mean when no run has the value."""
    found = values(group, metric.key)
    if not found:
        return math.nan, 0.0, 0
    mean = sum(found) / len(found)
    sd = math.sqrt(sum((v - mean) ** 2 for v in found) / (len(found) - 1)) if len(found) > 1 else 0.0
    return mean, sd, len(found)


def cell(group: Group, metric: Metric) -> str:
    """``0.7830 ± 0.0050`` over runs that differ, ``0.7830`` for one run (or equal runs:
    a parameter count), ``n/a`` for none."""
    mean, sd, n = summary(group, metric)
    if n == 0:
        return "n/a"
    return f"{mean:{metric.fmt}} ± {sd:{metric.fmt}}" if n > 1 and sd > 0 else f"{mean:{metric.fmt}}"


def markdown(groups: Sequence[Group], metrics: Sequence[Metric] = METRICS) -> str:
    """The final values as a Markdown table, one row per group in the report's order."""
    shown = [m for m in metrics if any(summary(g, m)[2] for g in groups)]
    seeds = max((len(g.runs) for g in groups), default=1)
    header = ["run", "n"] + [m.title for m in shown]  # n: runs (seeds) in the row
    rows = [[g.label, str(len(g.runs))] + [cell(g, m) for m in shown] for g in groups]
    lines = ["| " + " | ".join(header) + " |",
             "|:--|" + "--:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = ("Logged values, not smoothed: mean ± one standard deviation over the runs of "
            "each row (seeds)." if seeds > 1 else "Logged values, not smoothed (one run per row).")
    return "\n".join(lines) + "\n\n" + note


def bar_figure(groups: Sequence[Group], metric: Metric, majority: float | None = None) -> Any:
    """One metric's bars (a matplotlib Figure, about 900 px wide at dpi 100)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [g for g in groups if summary(g, metric)[2]]
    height = 1.6 + 0.55 * max(1, len(shown))
    figure, ax = plt.subplots(figsize=(9, height))
    labels, means, sds = [], [], []
    for g in shown:
        mean, sd, _ = summary(g, metric)
        labels.append(g.label)
        means.append(mean)
        sds.append(sd)
    ys = list(range(len(shown)))[::-1]  # the report's order, top to bottom
    colors = [KIND_COLORS.get(g.kind, "#0077bb") for g in shown]
    ax.barh(ys, means, xerr=[s if s > 0 else 0 for s in sds], color=colors, capsize=4,
            height=0.6)
    ax.set_yticks(ys, labels, fontsize=11)
    if metric.log and means and min(means) > 0:
        ax.set_xscale("log")
        ax.set_xlim(min(means) / 3, max(means) * 12)
    elif metric.accuracy:
        ax.set_xlim(0, 1.18)
        if majority is not None:
            ax.axvline(majority, color="black", linestyle=":", linewidth=1.2,
                       label=f"majority class {majority:.3f}")
            ax.legend(fontsize=9, loc="lower right")
    elif means:
        ax.set_xlim(0, max(m + s for m, s in zip(means, sds, strict=True)) * 1.35)
    for y, g in zip(ys, shown, strict=True):
        mean, sd, n = summary(g, metric)
        text = cell(g, metric) + (f"  (n={n})" if n > 1 else "")
        ax.annotate(text, (mean + sd, y), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=11, fontweight="bold")
    seeds = max((len(g.runs) for g in shown), default=1)
    spread = f"mean ± sd over {seeds} seeds" if seeds > 1 else "one run each"
    ax.set_title(f"{metric.title}: final values ({spread})", fontsize=12)
    ax.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    return figure


def bar_images(groups: Sequence[Group], majority: float | None = None,
               metrics: Sequence[Metric] = METRICS) -> dict[str, Any]:
    """``{metric key: RGB uint8 array (H, W, 3)}`` for every metric some run has."""
    import matplotlib.pyplot as plt
    import numpy as np

    images = {}
    for metric in metrics:
        if not any(summary(g, metric)[2] for g in groups):
            continue
        figure = bar_figure(groups, metric, majority)
        figure.set_dpi(100)
        figure.canvas.draw()
        images[metric.key] = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
        plt.close(figure)
    return images
