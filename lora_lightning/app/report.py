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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"
CSV_COLUMNS = (
    "run", "kind", "rank", "seed", "targets", "variant", "lr", "trainable_params", "total_params",
    "trainable_ratio", "test_acc", "test_balanced_acc", "test_size", "test_majority_acc",
    "best_val_acc", "monitor", "fit_seconds", "samples_per_sec", "train_gflops_per_step",
    "peak_tensor_mb", "tensor_params_mb", "tensor_grads_mb", "tensor_optimizer_mb",
    "tensor_activations_mb", "peak_rss_mb", "checkpoint_bytes", "adapter_bytes", "run_id",
    "overrides", "output_dir",
)
METRIC_NOTE = (
    "test acc is plain accuracy (correct / all test samples) of the checkpoint with the "
    "best validation accuracy (plain too)"
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


def lora_variant(config: Mapping[str, Any] | None) -> str:
    """What sets a LoRA config apart from plain LoRA, as its label says it ("" for none).

    >>> lora_variant({"r": 8, "use_dora": True, "use_rslora": True, "loraplus_lr_ratio": 16})
    'DoRA rsLoRA LoRA+ ratio=16'
    >>> lora_variant({"r": 8, "quantize_base": "nf4"})
    'QLoRA nf4'
    >>> lora_variant({"r": 8, "init": "gradient"})
    'gradient init'
    """
    if not config:
        return ""
    parts = []
    if config.get("quantize_base"):
        parts.append(f"QLoRA {config['quantize_base']}")
    if config.get("use_dora"):
        parts.append("DoRA")
    if config.get("use_rslora"):
        parts.append("rsLoRA")
    ratio = config.get("loraplus_lr_ratio")
    if ratio is not None:
        parts.append(f"LoRA+ ratio={float(ratio):g}")
    if config.get("init") == "gradient":
        parts.append("gradient init")
    return " ".join(parts)


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
    # A rank series (a sweep over lora.config.r) is labelled by rank alone; LoRA runs that
    # also differ in their targets or variant (q,v at r=8 beside all-linear at r=64) are not.
    alike = len({(g.runs[0].get("targets"), g.runs[0].get("label"), g.runs[0].get("variant"))
                 for g in lora}) == 1
    by_rank = alike and len({g.rank for g in lora}) == len(lora) and all(g.rank for g in lora)
    for g in ordered:
        if g.kind == "lora" and by_rank and len(lora) > 1:
            g.label = f"r={g.rank}"
        elif g.kind == "full":
            g.label = "full fine-tuning"
        elif g.kind == "head_only":
            g.label = "head only (frozen encoder)"
        elif g.kind == "lora" and g.rank:
            named = next((str(r["label"]) for r in g.runs if r.get("label")), "")
            targets = str(g.runs[0].get("targets") or "")
            g.label = (f"{named} r={g.rank}" if named
                       else f"LoRA {targets.replace(',', '+')} r={g.rank}" if targets else g.run)
        else:
            g.label = g.run
        if g.kind == "lora" and g.runs[0].get("variant"):
            g.label += f" {g.runs[0]['variant']}"
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


def _fmt_size(value: float) -> str:
    """Three significant digits below 100 (small models), whole numbers above."""
    if value is None or math.isnan(value):
        return "n/a"
    return format(value, ",.0f") if abs(value) >= 100 else format(value, ".3g")


def _same(groups: Sequence[Group], key: str) -> float | None:
    """The one value every run has for ``key``, or None when runs differ or lack it."""
    values = {round(v, 6) for g in groups for v in g.values(key)}
    return values.pop() if len(values) == 1 else None


def table_rows(groups: Sequence[Group]) -> list[list[str]]:
    """Header and one row per group, as strings.

    The accuracy column names its metric and, when every run shares one test split, its
    size and majority-class rate; otherwise each row carries them.
    """
    size, majority = _same(groups, "test_size"), _same(groups, "test_majority_acc")
    shared = size is not None and majority is not None
    acc_header = "test acc"
    if shared:
        acc_header += f" (n={size:,.0f}, majority {majority:.3f})"
    header = ["run", "trainable params", "ratio", acc_header]
    if not shared:
        header += ["test n", "majority"]
    header += ["GFLOPs/step", "peak tensor mem (MB)", "peak RSS (MB)", "train time (s)",
               "checkpoint (MB)"]
    rows = [header]
    for g in groups:
        ckpt = g.mean("checkpoint_bytes")
        row = [
            g.label,
            _fmt_num(g.mean("trainable_params"), ",.0f"),
            _fmt_num(100 * g.mean("trainable_ratio"), ".3f") + "%",
            _fmt_acc(g),
        ]
        if not shared:
            row += [_fmt_num(g.mean("test_size"), ",.0f"),
                    _fmt_num(g.mean("test_majority_acc"), ".3f")]
        rss = g.mean("peak_rss_mb")
        if math.isnan(rss):
            rss = g.mean("peak_mem_mb")  # result.json of older versions
        row += [
            _fmt_size(g.mean("train_gflops_per_step")),
            _fmt_size(g.mean("peak_tensor_mb")),
            _fmt_num(rss, ",.0f"),
            _fmt_num(g.mean("fit_seconds"), ".1f"),
            _fmt_num(ckpt / 1e6 if not math.isnan(ckpt) else ckpt, ",.2f"),
        ]
        rows.append(row)
    return rows


def table_notes(groups: Sequence[Group]) -> str:
    """What the table's columns mean, in one paragraph."""
    seeds = max((len(g.runs) for g in groups), default=1)
    spread = "; ± is one standard deviation over seeds" if seeds > 1 else ""
    return (
        f"{METRIC_NOTE}{spread}. GFLOPs/step: forward + backward of one training batch "
        "(torch FlopCounterMode). Peak tensor memory: parameters and buffers + gradients + "
        "optimizer state + activations saved for backward; peak RSS: the whole process "
        "(runtime, libraries, allocator caches included). Train time: wall time of fit, "
        "validation included."
    )


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
    """One row per job, the columns of :data:`CSV_COLUMNS`; ``overrides`` is the job's
    command-line overrides joined by spaces, which tell apart runs of the same name."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for result in results:
            row = {k: result.get(k) for k in CSV_COLUMNS}
            row["overrides"] = " ".join(result.get("overrides") or [])
            writer.writerow(row)


def plot(groups: Sequence[Group], path: Path, title: str = "") -> None:
    """Test accuracy vs trainable parameters (log x), each point labelled; full FT a line."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    points = [g for g in groups if g.kind != "full" and g.values("test_acc")]
    same_x: dict[float, int] = {}
    for g in points:
        x, y = g.mean("trainable_params"), g.mean("test_acc")
        k = same_x[x] = same_x.get(x, -1) + 1  # runs with equal params (other epochs, lr):
        x *= 1.06 ** k                          # dodged sideways, labels stacked
        color = "tab:blue" if g.kind == "lora" else "tab:gray"
        if len(g.values("test_acc")) > 1:
            ax.errorbar(x, y, yerr=g.std("test_acc"), fmt="o", color=color, capsize=3)
        else:
            ax.plot(x, y, "o", color=color)
        ax.annotate(g.label, (x, y), textcoords="offset points", xytext=(5, 6 + 11 * k),
                    fontsize=8)
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
    majority = _same(groups, "test_majority_acc")
    if majority is not None:
        ax.axhline(majority, color="black", linestyle=":",
                   label=f"majority class ({majority:.3f}): the floor")
    # From below the floor to a perfect score, so gaps are seen at their true size.
    accs = [v for g in groups for v in g.values("test_acc")]
    low = min([*accs, *([majority] if majority is not None else [])], default=0.0)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xscale("log")
    xs = [g.mean("trainable_params") for g in points if g.mean("trainable_params") > 0]
    if xs:  # whole decades, so a narrow range still gets labelled major ticks
        ax.set_xlim(10 ** math.floor(math.log10(min(xs))), 10 ** math.ceil(math.log10(max(xs))))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("trainable parameters (log scale)")
    size = _same(groups, "test_size")
    ax.set_ylabel("test accuracy (plain)" + (f", n={size:,.0f}" if size else ""))
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
    from lora_lightning.app.dashboard import (
        CURVES_IMAGE_TAG,
        add_final_values,
        add_sweep_image,
        write_experiment,
    )

    dirs = log_dirs(results)
    curves_path = None
    if len(dirs) == 1 and Path(dirs[0]).is_dir() and png_path is not None:
        curves_path = _val_curves(dirs[0], out / "val_curves.png")
    for log_dir in dirs:
        if Path(log_dir).is_dir():
            own = [r for r in results if r.get("log_dir") == log_dir]
            write_experiment(log_dir, own)
            own_groups = group_results(own)
            step = len(own)  # a later report (more runs) is the one TensorBoard shows
            add_final_values(log_dir, own_groups, _same(own_groups, "test_majority_acc"), step)
            if png_path is not None:
                add_sweep_image(log_dir, png_path, step=step)
            if curves_path is not None:
                add_sweep_image(log_dir, curves_path, CURVES_IMAGE_TAG, step)
    md = [f"# {title}", "", table, ""]
    if png_path is not None:
        md += [f"![test accuracy vs trainable parameters]({png_path.name})", ""]
    if curves_path is not None:
        md += [f"![validation accuracy and loss of every run]({curves_path.name})", ""]
    md += [f"{len(results)} runs from `{Path(sweep_dir)}`. {table_notes(groups)}", ""]
    warning = _small_test(groups)
    if warning:
        md += [f"**Warning:** {warning}", ""]
    md_path.write_text("\n".join(md))
    return {"table": table, "csv": csv_path, "md": md_path, "png": png_path,
            "curves": curves_path,
            "log_dirs": log_dirs(results), "groups": groups}


def _val_curves(log_dir: str, png: Path) -> Path | None:
    """Validation accuracy and loss of every run, one line each (``app.curves``), or None
    when the log dir has no such curves."""
    from lora_lightning.app.curves import plot_curves

    try:
        return plot_curves(log_dir, png)
    except (FileNotFoundError, ValueError):
        return None


def _small_test(groups: Sequence[Group]) -> str | None:
    from lora_lightning.app.data_info import small_test_warning

    sizes = [v for g in groups for v in g.values("test_size")]
    majority = _same(groups, "test_majority_acc")
    return small_test_warning(int(min(sizes)), majority) if sizes else None


def summary_text(report: dict[str, Any]) -> str:
    """What the CLI and the Hydra callback print after a sweep."""
    lines = ["", report["table"], "", table_notes(report["groups"])]
    warning = _small_test(report["groups"])
    if warning:
        lines.append(f"Warning: {warning}")
    written = [report["csv"], report["md"]] + [
        report[k] for k in ("png", "curves") if report.get(k)]
    lines.append("Report: " + ", ".join(str(p) for p in written))
    for log_dir in report["log_dirs"]:
        lines.append(f"Compare the runs: {command('tensorboard')} --logdir {log_dir}")
    if report["log_dirs"]:
        lines.append(open_line())
    return "\n".join(lines)


def open_line(final_values: bool = True) -> str:
    """Where to look once TensorBoard runs: the comparison, unsmoothed (and, after a
    sweep, where the final values are)."""
    from lora_lightning.app.dashboard import dashboard_url

    line = (f"  then open {dashboard_url()} (Custom Scalars, smoothing 0; untick 'Ignore "
            "outliers in chart scaling' to see every point)")
    if final_values:
        line += ("; the final values, unsmoothed: Text (a table) and Images (a chart per "
                 "number; tick 'Show actual image size'), run 'comparison'")
    return line + "."


def run_summary(result: dict[str, Any]) -> str:
    """What a single run (not a sweep) prints at its end: its row of the table and where to look."""
    groups = group_results([result])
    lines = ["", markdown_table(groups), "", table_notes(groups)]
    warning = _small_test(groups)
    if warning:
        lines.append(f"Warning: {warning}")
    if result.get("output_dir"):
        lines.append(f"Result: {Path(result['output_dir']) / RESULT_FILE}")
    if result.get("log_dir"):
        lines.append(f"Curves: {command('tensorboard')} --logdir {result['log_dir']}")
        lines.append(open_line(final_values=False))
    return "\n".join(lines)


def command(name: str) -> str:
    """How to call this environment's console script ``name`` from the current folder.

    The bare name when the shell finds this very script on PATH, else its path
    (``.venv/bin/tensorboard`` after ``make demo``, where .venv is not activated).
    """
    import os
    import shutil

    script = Path(sys.executable).parent / name
    if not script.exists():
        return name
    found = shutil.which(name)
    if found and Path(found).resolve() == script.resolve():
        return name
    relative = os.path.relpath(script)
    return relative if not relative.startswith("..") else str(script)


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
