"""Per-seed test accuracy of full fine-tuning and LoRA all-linear on each held-out set,
and the paired gap (LoRA minus full, in points), from the jobs' result.json files.

    python experiments/recipe/gaps.py outputs/recipe_tweets outputs/recipe_speeches
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
    print("| set | seed | full fine-tuning | LoRA all-linear | LoRA − full (points) |")
    print("|---|---:|---:|---:|---:|")
    for folder in dirs:
        acc: dict[tuple[str, int], float] = {}
        for path in Path(folder).rglob("result.json"):
            r = json.loads(path.read_text())
            acc[(r["kind"], int(r["seed"]))] = float(r["test_acc"])
        seeds = sorted({s for k, s in acc if ("full", s) in acc and ("lora", s) in acc})
        name = Path(folder).name.removeprefix("recipe_")
        for s in seeds:
            full, lora = acc[("full", s)], acc[("lora", s)]
            print(f"| {name} | {s} | {full:.4f} | {lora:.4f} | {100 * (lora - full):+.1f} |")
        if len(seeds) > 1:
            fulls = [acc[("full", s)] for s in seeds]
            loras = [acc[("lora", s)] for s in seeds]
            gaps = [100 * (b - a) for a, b in zip(fulls, loras, strict=True)]
            print(f"| {name} | mean ± sd | {statistics.fmean(fulls):.4f} ± "
                  f"{statistics.stdev(fulls):.4f} | {statistics.fmean(loras):.4f} ± "
                  f"{statistics.stdev(loras):.4f} | {statistics.fmean(gaps):+.1f} ± "
                  f"{statistics.stdev(gaps):.1f} |")
        for s in sorted({s for _, s in acc} - set(seeds)):  # one of the two still pending
            cells = [f"{acc[(k, s)]:.4f}" if (k, s) in acc else "pending" for k in ("full", "lora")]
            print(f"| {name} | {s} | {cells[0]} | {cells[1]} | |")


if __name__ == "__main__":
    main(sys.argv[1:])
