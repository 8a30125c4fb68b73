"""The LM experiment's tables: perplexity, cost, tensor memory, sizes, exports, generations.

Reads every ``result.json`` of a sweep folder (``experiment=lm_lora``) and prints Markdown::

    python -m lora_lightning.app.lm_report outputs/lm_lora/<date>_<time>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lora_lightning.app.report import ReportError, load_results

MB = 1e6


def _mb(value: Any) -> str:
    return "—" if value is None else f"{value / MB:,.1f} MB"


def _rss(result: dict[str, Any]) -> str:
    """The run's peak RSS: ``peak_rss_mb``, or ``peak_mem_mb`` in result.json of older versions."""
    value = result.get("peak_rss_mb", result.get("peak_mem_mb"))
    return "—" if value is None else f"{value:,.0f} MiB"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip() or "(nothing: EOS)"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| run | trainable | val ppl before | val ppl after | tokens/s | peak RSS | wall time "
        "(fit) | checkpoint | adapter (PEFT) | merged folder | merged greedy = live | "
        "PEFT logits max diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in results:
        peft = r.get("peft_logits_max_abs_diff")
        lines.append(
            f"| {r['run']} | {r['trainable_params']:,} ({100 * r['trainable_ratio']:.2f}%) | "
            f"{r.get('val_ppl_before', float('nan')):.2f} | {r.get('val_ppl_after', float('nan')):.2f} | "
            f"{r.get('tokens_per_sec', float('nan')):.0f} | {_rss(r)} | "
            f"{r.get('fit_seconds', 0) / 60:.1f} min | {_mb(r.get('checkpoint_bytes'))} | "
            f"{_mb(r.get('export_adapter_bytes'))} | {_mb(r.get('export_merged_bytes'))} | "
            f"{'yes' if r.get('merged_generation_equal') else 'NO'} | "
            f"{'—' if peft is None else f'{peft:.1e}'} |"
        )
    return "\n".join(lines)


def memory(results: list[dict[str, Any]]) -> str:
    """One training step's tensor memory by kind (``RunRecorder``); "" when no run recorded it."""
    keys = ("tensor_params_mb", "tensor_grads_mb", "tensor_optimizer_mb",
            "tensor_activations_mb", "peak_tensor_mb")
    rows = [r for r in results if r.get("peak_tensor_mb") is not None]
    if not rows:
        return ""
    lines = ["| run | weights | gradients | optimizer state | activations | step peak (tensors) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = " | ".join("—" if r.get(k) is None else f"{r[k]:,.1f} MiB" for k in keys)
        lines.append(f"| {r['run']} | {cells} |")
    return "\n".join(lines)


def generations(results: list[dict[str, Any]]) -> str:
    lines = ["| run | prompt | before | after |", "|---|---|---|---|"]
    for r in results:
        before = r.get("generations_before") or []
        after = r.get("generations_after") or []
        for b, a in zip(before, after, strict=False):
            lines.append(f"| {r['run']} | {_cell(b['prompt'])} | {_cell(b['output'])} | "
                         f"{_cell(a['output'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_lightning.app.lm_report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir")
    args = parser.parse_args(argv)
    try:
        results = load_results(args.sweep_dir)
    except ReportError as err:
        print(f"lm_report: {err}", file=sys.stderr)
        return 1
    missing = [r["run"] for r in results if "val_ppl_before" not in r]
    if missing:
        print(f"lm_report: {missing} in {Path(args.sweep_dir)} have no LM results "
              "(val_ppl_before); run experiment=lm_lora.", file=sys.stderr)
        return 1
    split = memory(results)
    print("\n\n".join(part for part in (table(results), split, generations(results)) if part))
    return 0


if __name__ == "__main__":
    sys.exit(main())
