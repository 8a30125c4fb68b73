"""Per-seed test accuracy of full fine-tuning and each LoRA run on a held-out set, and the
paired gap (LoRA minus full fine-tuning, in points, same seed).

    python experiments/recipe/gaps.py tweets=outputs/recipe_tweets speeches=outputs/recipe_speeches
    python experiments/recipe/gaps.py speeches=outputs/emb_speeches,experiments/recipe/rank8/speeches/sweep.csv
    python experiments/recipe/gaps.py speeches=outputs/r64_rs_speeches,experiments/recipe/rank8/speeches/sweep.csv#full_ft

Each argument is ``set=source[,source...]``; a source is a sweep folder (the jobs'
``result.json`` files) or a ``sweep.csv`` written by ``lora_lightning.app.report`` (runs
kept from an earlier session), optionally followed by ``#run`` to keep only that run's rows
(a variant that kept the run's name, such as ``lora_all_linear`` at another rank, beside
the earlier runs' full fine-tuning). A run and seed found in two sources is an error.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

LABELS = {"full_ft": "full fine-tuning", "lora_all_linear": "LoRA all-linear",
          "lora_all_linear_emb": "LoRA all-linear+embeddings",
          "lora_all_linear_r64": "LoRA all-linear r=64, gradient init"}


def _rows(source: Path) -> list[tuple[str, int, float]]:
    if source.suffix == ".csv":
        with source.open(newline="") as f:
            return [(r["run"], int(r["seed"]), float(r["test_acc"])) for r in csv.DictReader(f)]
    if not source.is_dir():
        sys.exit(f"gaps.py: {source} is neither a sweep folder nor a sweep.csv; pass one of those.")
    rows = []
    for path in sorted(source.rglob("result.json")):
        r = json.loads(path.read_text())
        rows.append((str(r["run"]), int(r["seed"]), float(r["test_acc"])))
    return rows


def _collect(sources: list[str]) -> dict[str, dict[int, float]]:
    acc: dict[str, dict[int, float]] = {}
    for spec in sources:
        path, _, only = spec.partition("#")
        source = Path(path)
        rows = every = _rows(source)
        if only:
            rows = [row for row in every if row[0] == only]
            if not rows:
                sys.exit(f"gaps.py: {spec} keeps no rows: {source} has no run named {only!r}; "
                         f"its runs are {sorted({r for r, _, _ in every})}.")
        for run, seed, value in rows:
            if seed in acc.setdefault(run, {}):
                sys.exit(f"gaps.py: {run} seed {seed} appears twice (again in {source}); "
                         "keep each run in one source.")
            acc[run][seed] = value
    return acc


def _mean_sd(values: list[float], scale: float = 1.0, fmt: str = ".4f") -> str:
    values = [scale * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{fmt}} ± {sd:{fmt.replace('+', '')}}"


def main(args: list[str]) -> None:
    if not args or any("=" not in a for a in args):
        sys.exit("usage: gaps.py SET=SOURCE[#RUN][,SOURCE[#RUN]...] ...  (e.g. "
                 "tweets=outputs/recipe_tweets,experiments/recipe/rank8/tweets/sweep.csv#full_ft)")
    print("| set | LoRA run | seeds | full fine-tuning | LoRA | LoRA − full (points), per seed "
          "| mean ± sd |")
    print("|---|---|---|---:|---:|---|---:|")
    for arg in args:
        name, _, spec = arg.partition("=")
        acc = _collect([s for s in spec.split(",") if s])
        full = acc.get("full_ft", {})
        for run in sorted(r for r in acc if r != "full_ft"):
            seeds = sorted(set(acc[run]) & set(full))
            if not seeds:
                print(f"| {name} | {LABELS.get(run, run)} | none paired | | | | |")
                continue
            gaps = [100 * (acc[run][s] - full[s]) for s in seeds]
            per_seed = ", ".join(f"{g:+.1f}" for g in gaps)
            print(f"| {name} | {LABELS.get(run, run)} | {','.join(map(str, seeds))} | "
                  f"{_mean_sd([full[s] for s in seeds])} | {_mean_sd([acc[run][s] for s in seeds])} "
                  f"| {per_seed} | **{_mean_sd(gaps, fmt='+.1f')}** |")


if __name__ == "__main__":
    main(sys.argv[1:])
