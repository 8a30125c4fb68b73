"""Smoke test for benchmarks/bench_lm.py on the tiny Llama: every row and ratio is filled.

No timing assertions (timings on a shared CI machine mean nothing at this size); the real
run on SmolLM2 is committed in benchmarks/results_lm.md.
"""

from __future__ import annotations

import re

import pytest

from tests._helpers import loaded_benchmark


def test_bench_lm_runs_every_variant_and_ratio(tmp_path, tiny_lm_dir):
    pytest.importorskip("peft")  # the benchmark's PEFT variants
    with loaded_benchmark("bench_lm.py", "bench_lora") as module:
        out = tmp_path / "results.md"
        report = module.main(["--model-path", str(tiny_lm_dir), "--batch", "2", "--seq", "16",
                              "--steps", "1", "--threads", "1", "--out", str(out)])
    assert out.read_text() == report
    ratios = re.findall(r"^\| ours .* \| (\d+\.\d{3}) \|", report, re.MULTILINE)
    assert len(ratios) == 5 and all(float(r) > 0 for r in ratios)
    for variant in ("full fine-tuning", "ours r=8 q,v", "peft r=8 q,v", "ours r=8 all-linear",
                    "peft r=8 all-linear", "ours r=8 q,v + ckpt"):
        assert f"| {variant} |" in report
    # trainable counts: PEFT and ours adapt the same layers
    counts = dict(re.findall(r"^\| (\w+ r=8 [\w,-]+) \| ([\d,]+) \|", report, re.MULTILINE))
    assert counts["ours r=8 q,v"] == counts["peft r=8 q,v"]
    assert counts["ours r=8 all-linear"] == counts["peft r=8 all-linear"]
