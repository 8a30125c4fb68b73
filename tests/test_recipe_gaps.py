"""experiments/recipe/gaps.py: the paired gaps the recipe's README reports."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

GAPS = Path(__file__).resolve().parents[1] / "experiments" / "recipe" / "gaps.py"


def _csv(path: Path, rows: list[tuple[str, int, float]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "seed", "test_acc"])
        writer.writerows(rows)
    return path


def _sweep(folder: Path, run: str, accs: dict[int, float]) -> Path:
    for seed, acc in accs.items():
        job = folder / f"job{seed}" / f"00_{run}"
        job.mkdir(parents=True)
        (job / "result.json").write_text(json.dumps({"run": run, "seed": seed, "test_acc": acc}))
    return folder


def _gaps(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GAPS), *args], capture_output=True, text=True)


def test_a_variant_is_paired_with_the_earlier_full_fine_tuning_by_seed(tmp_path):
    earlier = _csv(tmp_path / "sweep.csv", [("full_ft", 0, 0.80), ("full_ft", 1, 0.70),
                                            ("lora_all_linear", 0, 0.10), ("lora_all_linear", 1, 0.10)])
    variant = _sweep(tmp_path / "variant", "lora_all_linear", {0: 0.79, 1: 0.72})
    # Without "#full_ft" the earlier LoRA rows collide with the variant's.
    clash = _gaps(f"s={variant},{earlier}")
    assert clash.returncode != 0 and "lora_all_linear seed 0 appears twice" in clash.stderr
    done = _gaps(f"s={variant},{earlier}#full_ft")
    assert done.returncode == 0, done.stderr
    row = done.stdout.strip().splitlines()[-1]
    assert "| s | LoRA all-linear | 0,1 |" in row
    assert "-1.0, +2.0" in row and "**+0.5 ± 2.1**" in row  # per seed, then mean ± sd


def test_a_filter_that_keeps_nothing_names_the_runs_there(tmp_path):
    earlier = _csv(tmp_path / "sweep.csv", [("full_ft", 0, 0.8), ("lora_qv", 0, 0.7)])
    result = _gaps(f"s={earlier}#full")
    assert result.returncode != 0
    assert "no run named 'full'" in result.stderr and "['full_ft', 'lora_qv']" in result.stderr
