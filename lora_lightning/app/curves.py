"""Validation curves from TensorBoard event files, one line per run, as a PNG.

TensorBoard shows the runs of a sweep side by side in a browser; this renders the same
curves into a file for a README::

    python -m lora_lightning.app.curves <log_dir> <out.png> [--tags val/acc val/loss]

``log_dir`` is the folder passed to ``tensorboard --logdir``: each subfolder is a run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_TAGS = ("val/acc", "val/loss")


def read_scalars(
    log_dir: str | Path, tags: Sequence[str] = DEFAULT_TAGS
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{run: {tag: [(step, value), ...]}}`` for every run folder under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(log_dir)
    runs: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if not any(run_dir.glob("events.out.tfevents.*")):
            continue
        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        acc.Reload()
        available = set(acc.Tags().get("scalars", []))
        runs[run_dir.name] = {
            tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags if tag in available
        }
    if not runs:
        raise FileNotFoundError(f"no TensorBoard runs (event files) under {root}.")
    return runs


def plot_curves(
    log_dir: str | Path, out: str | Path, tags: Sequence[str] = DEFAULT_TAGS, title: str = ""
) -> Path:
    """Draw one panel per tag with one line per run; return the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_scalars(log_dir, tags)
    fig, axes = plt.subplots(1, len(tags), figsize=(5.2 * len(tags), 4.0), squeeze=False)
    for ax, tag in zip(axes[0], tags, strict=True):
        for run, series in runs.items():
            points = series.get(tag)
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o", markersize=3, label=run)
        ax.set_xlabel("training step")
        ax.set_ylabel(tag)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_lightning.app.curves",
        description="Render TensorBoard scalar curves of every run under a log dir to a PNG.",
    )
    parser.add_argument("log_dir", help="the dir given to `tensorboard --logdir`")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--tags", nargs="+", default=list(DEFAULT_TAGS))
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        path = plot_curves(args.log_dir, args.out, args.tags, args.title)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
