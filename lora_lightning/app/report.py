"""Sweep report: a table, ``sweep.csv``, ``sweep.md`` and ``sweep.png`` from ``result.json``.

Every job of the app writes ``<output_dir>/result.json``; a sweep folder holds one per
job. Jobs that differ only in ``seed`` form one group: the table gives the mean test
accuracy with its standard deviation over seeds, and the plot draws the mean with error
bars (one standard deviation) against the number of trainable parameters (log scale),
each point labelled with its rank ``r`` (or its run name), full fine-tuning as a
horizontal line with its spread as a band. Run it by hand with::

    python -m lora_lightning.app.report <sweep_dir> [--out <dir>]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"
CSV_COLUMNS = (
    "run", "kind", "rank", "seed", "targets", "lr", "trainable_params", "total_params",
    "trainable_ratio", "test_acc", "best_val_acc", "fit_seconds", "samples_per_sec",
    "peak_mem_mb", "checkpoint_bytes", "adapter_bytes", "run_id", "output_dir",
)


class ReportError(Exception):
    """No results to report, or a result file that cannot be read."""


@dataclass
class Group:
    """The runs of one configuration (all seeds)."""

    run: str
    kind: str
    rank: int | None
    runs: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""

    def values(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.runs if r.get(key) is not None]

    def mean(self, key: str) -> float:
        values = self.values(key)
        return statistics.fmean(values) if values else math.nan

    def std(self, key: str) -> float:
        values = self.values(key)
        return statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def seeds(self) -> list[int]:
        return sorted(int(r.get("seed", 0)) for r in self.runs)


def load_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``result.json`` under ``sweep_dir`` (any depth), sorted by run id."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory; pass the sweep folder (holding the jobs).")
    results = []
    for path in sorted(root.rglob(RESULT_FILE)):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ReportError(f"cannot read {path}: {err}") from err
        if not isinstance(data, dict) or "run" not in data:
            raise ReportError(f"{path} is not a result of lora-lightning (no 'run' entry).")
        data.setdefault("output_dir", str(path.parent))
        results.append(data)
    if not results:
        raise ReportError(
            f"no {RESULT_FILE} under {root}; the jobs failed or this is not a sweep folder."
        )
    return sorted(results, key=lambda r: (str(r.get("run_id", r["run"])), r.get("seed", 0)))


def _config_key(result: dict[str, Any]) -> tuple:
    """Jobs with equal keys differ only in seed."""
    overrides = tuple(sorted(o for o in result.get("overrides", []) if not o.startswith("seed=")))
    return result["run"], result.get("kind"), result.get("rank"), overrides


def group_results(results: Iterable[dict[str, Any]]) -> list[Group]:
    """Group runs that differ only in seed; order: by trainable params, full FT last."""
    groups: dict[tuple, Group] = {}
    for result in results:
        key = _config_key(result)
        if key not in groups:
            groups[key] = Group(result["run"], str(result.get("kind", "lora")), result.get("rank"))
        groups[key].runs.append(result)
    ordered = sorted(
        groups.values(),
        key=lambda g: (g.kind == "full", g.mean("trainable_params"), g.run),
    )
    lora = [g for g in ordered if g.kind == "lora"]
    by_rank = len({g.rank for g in lora}) == len(lora) and all(g.rank for g in lora)
    for g in ordered:
        if g.kind == "lora" and by_rank and len(lora) > 1:
            g.label = f"r={g.rank}"
        elif g.kind == "full":
            g.label = "full fine-tuning"
        else:
            g.label = g.run
        namesakes = [set(_config_key(o.runs[0])[3]) for o in ordered if o.run == g.run]
        if len(namesakes) > 1:  # same run name: show the overrides that tell them apart
            own = set(_config_key(g.runs[0])[3])
            g.label += f" [{' '.join(sorted(own - set.intersection(*namesakes)))}]"
    return ordered


def _fmt_acc(g: Group) -> str:
    mean = g.mean("test_acc")
    if math.isnan(mean):
        return "n/a"
    if len(g.values("test_acc")) > 1:
        return f"{mean:.4f} ± {g.std('test_acc'):.4f} (n={len(g.values('test_acc'))})"
    return f"{mean:.4f}"


def _fmt_num(value: float, fmt: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, fmt)


def table_rows(groups: Sequence[Group]) -> list[list[str]]:
    """Header and one row per group, as strings."""
    rows = [[
        "run", "trainable params", "ratio", "test acc", "train time (s)", "peak mem (MB)",
        "checkpoint (MB)",
    ]]
    for g in groups:
        ckpt = g.mean("checkpoint_bytes")
        rows.append([
            g.label if g.kind != "full" else g.run + g.label[len("full fine-tuning"):],
            _fmt_num(g.mean("trainable_params"), ",.0f"),
            _fmt_num(100 * g.mean("trainable_ratio"), ".3f") + "%",
            _fmt_acc(g),
            _fmt_num(g.mean("fit_seconds"), ".1f"),
            _fmt_num(g.mean("peak_mem_mb"), ",.0f"),
            _fmt_num(ckpt / 1e6 if not math.isnan(ckpt) else ckpt, ",.2f"),
        ])
    return rows


def markdown_table(groups: Sequence[Group]) -> str:
    """The table in GitHub Markdown (also readable as plain text in a terminal)."""
    rows = table_rows(groups)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = [False] + [True] * (len(widths) - 1)

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if r else ":" + "-" * (w + 1) for w, r in zip(widths, right, strict=True)
    ) + "|"
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


def write_csv(results: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per job, the columns of :data:`CSV_COLUMNS`."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for result in results:
            writer.writerow({k: result.get(k) for k in CSV_COLUMNS})


def plot(groups: Sequence[Group], path: Path, title: str = "") -> None:
    """Test accuracy vs trainable parameters (log x), each point labelled; full FT a line."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    points = [g for g in groups if g.kind != "full" and g.values("test_acc")]
    for g in points:
        x, y = g.mean("trainable_params"), g.mean("test_acc")
        color = "tab:blue" if g.kind == "lora" else "tab:gray"
        if len(g.values("test_acc")) > 1:
            ax.errorbar(x, y, yerr=g.std("test_acc"), fmt="o", color=color, capsize=3)
        else:
            ax.plot(x, y, "o", color=color)
        ax.annotate(g.label, (x, y), textcoords="offset points", xytext=(5, 6), fontsize=8)
    lora = sorted((g for g in points if g.kind == "lora"), key=lambda g: g.mean("trainable_params"))
    if len(lora) > 1 and all(g.label.startswith("r=") for g in lora):  # a rank series
        ax.plot(
            [g.mean("trainable_params") for g in lora], [g.mean("test_acc") for g in lora],
            "-", color="tab:blue", alpha=0.4, label="LoRA",
        )
    for g in groups:
        if g.kind != "full" or not g.values("test_acc"):
            continue
        y, spread = g.mean("test_acc"), g.std("test_acc")
        n = len(g.values("test_acc"))
        ax.axhline(y, color="tab:red", linestyle="--",
                   label=f"full fine-tuning ({g.mean('trainable_params'):,.0f} params"
                         f"{f', n={n}' if n > 1 else ''})")
        if spread > 0:
            ax.axhspan(y - spread, y + spread, color="tab:red", alpha=0.12)
    ax.set_xscale("log")
    xs = [g.mean("trainable_params") for g in points if g.mean("trainable_params") > 0]
    if xs:  # whole decades, so a narrow range still gets labelled major ticks
        ax.set_xlim(10 ** math.floor(math.log10(min(xs))), 10 ** math.ceil(math.log10(max(xs))))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy")
    seeds = max((len(g.runs) for g in groups), default=1)
    subtitle = f"mean ± 1 std over {seeds} seeds" if seeds > 1 else "one seed per point"
    ax.set_title(f"{title} ({subtitle})" if title else subtitle, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_dirs(results: Iterable[dict[str, Any]]) -> list[str]:
    """The TensorBoard dirs the runs logged to (normally one per sweep)."""
    return sorted({str(r["log_dir"]) for r in results if r.get("log_dir")})


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None,
                 title: str | None = None) -> dict[str, Any]:
    """Write sweep.csv, sweep.md and sweep.png (if matplotlib is installed).

    Returns ``{"table": markdown, "csv": path, "md": path, "png": path or None,
    "log_dirs": [...], "groups": [...]}``.
    """
    results = load_results(sweep_dir)
    groups = group_results(results)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = title if title is not None else Path(sweep_dir).resolve().parent.name
    table = markdown_table(groups)
    csv_path, md_path, png_path = out / "sweep.csv", out / "sweep.md", out / "sweep.png"
    write_csv(results, csv_path)
    try:
        plot(groups, png_path, title)
    except ImportError:
        png_path = None
    md = [f"# {title}", "", table, ""]
    if png_path is not None:
        md += [f"![test accuracy vs trainable parameters]({png_path.name})", ""]
    md += [
        f"{len(results)} runs from `{Path(sweep_dir)}`. Test accuracy on the test split of "
        "the best checkpoint by validation accuracy; ± is one standard deviation over "
        "seeds. Train time is the wall time of `fit` (validation included); peak memory "
        "is the process's peak RSS during fit on CPU, peak allocated CUDA memory on GPU.",
        "",
    ]
    md_path.write_text("\n".join(md))
    return {"table": table, "csv": csv_path, "md": md_path, "png": png_path,
            "log_dirs": log_dirs(results), "groups": groups}


def summary_text(report: dict[str, Any]) -> str:
    """What the CLI and the Hydra callback print after a sweep."""
    lines = ["", report["table"], ""]
    written = [report["csv"], report["md"]] + ([report["png"]] if report["png"] else [])
    lines.append("Report: " + ", ".join(str(p) for p in written))
    for log_dir in report["log_dirs"]:
        lines.append(f"Compare the runs: tensorboard --logdir {log_dir}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_lightning.app.report",
        description="Summarise a lora-lightning sweep: sweep.csv, sweep.md, sweep.png.",
    )
    parser.add_argument("sweep_dir", help="the sweep folder (holding the jobs' result.json)")
    parser.add_argument("--out", default=None, help="where to write (default: sweep_dir)")
    parser.add_argument("--title", default=None, help="plot and page title")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.sweep_dir, args.out, args.title)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
