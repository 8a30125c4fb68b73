"""benchmarks/bench_activations.py at its tiny size: every row is filled, and on a
bfloat16 base our default path keeps less for backward and makes fewer activation-sized
copies than the plain ops (which cast every adapted layer's input to float32)."""

from __future__ import annotations

import pytest

from tests._helpers import loaded_benchmark


def test_tiny_run_fills_every_row_and_the_default_path_saves_less_on_bf16():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    with loaded_benchmark("bench_activations.py") as module:
        rows = module.main(["--tiny"])
    assert len(rows) == 16
    by = {(label, name): (mib, copies, gemms) for label, name, mib, copies, gemms in rows}
    for (_, name), (mib, _, gemms) in by.items():
        assert mib > 0 and gemms > 0, name
    for label in ("bfloat16 (bf16-true), float32 adapters",
                  "bfloat16, bf16 autocast, float32 adapters"):
        ours, plain = by[label, "ours"], by[label, "ours, plain ops"]
        assert ours[0] < plain[0] and ours[1] < plain[1], label
        assert ours[2] == plain[2], label  # the same GEMMs, fewer copies
