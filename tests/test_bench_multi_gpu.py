"""benchmarks/gpu/bench_multi_gpu.py in its CPU smoke mode: every section runs and reports
a ratio to the base model (the GPU figures themselves are pending a GPU machine)."""

from __future__ import annotations

import json
import math

from tests._helpers import loaded_benchmark


def test_smoke_mode_runs_every_section(tmp_path):
    with loaded_benchmark("gpu/bench_multi_gpu.py", "bench_multi") as module:
        rows = module.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "bench_multi_gpu.json").read_text()) == rows
    sections = [r["section"] for r in rows]
    assert sections == ["setup", "mixed", "mixed", "single", "single", "decode"]
    assert rows[0]["peft"] is True
    for row in rows[1:]:
        ratios = {k: v for k, v in row.items() if k.endswith("/base")}
        assert ratios and all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert {"ours/base", "peft/base"} <= set(rows[1])
