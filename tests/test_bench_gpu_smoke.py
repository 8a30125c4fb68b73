"""Smoke test for benchmarks/gpu/bench_gpu.py (issue 20's GPU table): its CPU mode runs
every section on a tiny model and reports every ratio, so the GPU run has been tried."""

from __future__ import annotations

import json
import math

import pytest

from tests._helpers import loaded_benchmark


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    with loaded_benchmark("gpu/bench_gpu.py") as module:
        out = tmp_path_factory.mktemp("gpu")
        rows = module.main(["--device", "cpu", "--smoke", "--compile-layers", "1",
                            "--out", str(out)])
    return rows, out


def test_every_section_runs_and_reports_its_ratios(results):
    rows, out = results
    sections = [r["section"] for r in rows]
    assert [s for s in sections if s.endswith(("_done", "_failed"))] == [
        "train_done", "compile_done", "profile_done"]
    ratios = [r for r in rows if r["section"] == "train_ratio"]
    assert len(ratios) == 8
    compiled = next(r for r in rows if r["section"] == "compile_ratio")
    for value in [r["step"] for r in ratios] + [compiled["ours_over_peft"]]:
        assert math.isfinite(value) and value > 0
    profile = {r["variant"]: r["calls_per_step"] for r in rows if r["section"] == "profile"}
    assert profile["ours_all"]["aten::mm"] > profile["full"]["aten::mm"] > 0
    assert json.loads((out / "bench_gpu.json").read_text()) == rows
    table = (out / "bench_gpu.md").read_text()
    assert "| ours/full all-linear |" in table and "| compiled ours/peft all-linear |" in table
