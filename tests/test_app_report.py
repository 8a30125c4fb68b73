"""The sweep report, on synthetic result.json files (no training)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lora_lightning.app.hydra_callbacks import SweepReport
from lora_lightning.app.report import (
    ReportError,
    group_results,
    load_results,
    main,
    write_report,
)

TOTAL = 22_600_000


def _result(run: str, kind: str, rank: int | None, seed: int, acc: float, params: int,
            job: int, log_dir: str = "/logs/tb") -> dict:
    return {
        "run": run, "run_id": f"{job}_{run}", "kind": kind, "rank": rank, "seed": seed,
        "trainable_params": params, "total_params": TOTAL, "trainable_ratio": params / TOTAL,
        "test_acc": acc, "best_val_acc": acc + 0.01, "fit_seconds": 10.0 + job,
        "peak_rss_mb": 1500.0, "checkpoint_bytes": params * 12, "samples_per_sec": 50.0,
        "test_size": 1000, "test_majority_acc": 0.566, "peak_tensor_mb": 90.0 + params / 1e4,
        "train_gflops_per_step": 12.5,
        "log_dir": log_dir, "overrides": [f"rank={rank or 'full'}", f"seed={seed}"],
    }


def _write(sweep: Path, results: list[dict]) -> Path:
    for r in results:
        folder = sweep / r["run_id"]
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(r))
    return sweep


@pytest.fixture
def multi_seed_sweep(tmp_path) -> Path:
    """Ranks 1, 4, 16 and full fine-tuning, three seeds each."""
    results, job = [], 0
    for seed in (0, 1, 2):
        for rank in (1, 4, 16):
            acc = 0.70 + 0.01 * math.log2(rank) + 0.01 * seed
            results.append(_result(f"rank_{rank}", "lora", rank, seed, acc, 20_000 * rank, job))
            job += 1
        results.append(_result("rank_full", "full", None, seed, 0.77 + 0.01 * seed, TOTAL, job))
        job += 1
    return _write(tmp_path / "sweep", results)


def test_groups_pool_seeds_and_order_by_trainable_params(multi_seed_sweep):
    groups = group_results(load_results(multi_seed_sweep))
    assert [g.label for g in groups] == ["r=1", "r=4", "r=16", "full fine-tuning"]
    assert all(g.seeds == [0, 1, 2] for g in groups)
    r4 = groups[1]
    assert r4.mean("test_acc") == pytest.approx(0.72 + 0.01)
    assert r4.std("test_acc") == pytest.approx(0.01)


def test_report_writes_csv_md_png(multi_seed_sweep):
    report = write_report(multi_seed_sweep, title="rank sweep")
    rows = list(csv.DictReader(report["csv"].open()))
    assert len(rows) == 12
    assert {"run", "rank", "seed", "test_acc", "trainable_params"} <= set(rows[0])
    md = report["md"].read_text()
    assert md.startswith("# rank sweep")
    assert "± 0.0100 (n=3)" in md
    assert "![test accuracy vs trainable parameters](sweep.png)" in md
    png = report["png"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert report["log_dirs"] == ["/logs/tb"]


def test_table_has_the_comparison_columns(multi_seed_sweep):
    table = write_report(multi_seed_sweep)["table"]
    header = table.splitlines()[0]
    for column in ("run", "trainable params", "ratio", "test acc (n=1,000, majority 0.566)",
                   "GFLOPs/step", "peak tensor mem", "peak RSS", "train time", "checkpoint"):
        assert column in header
    assert "rank_full" not in table  # the baseline is named for what it is
    assert "| full fine-tuning " in table and "100.000%" in table


def test_single_seed_runs_are_labelled_by_name_when_ranks_repeat(tmp_path):
    # Two LoRA runs at the same r=8 (lora=qv and lora=all_linear): points carry their run names.
    sweep = _write(tmp_path / "s", [
        _result("full_ft", "full", None, 0, 0.77, TOTAL, 0),
        _result("lora_qv", "lora", 8, 0, 0.74, 74_498, 1),
        _result("lora_all_linear", "lora", 8, 0, 0.76, 332_546, 2),
        _result("head_only", "head_only", None, 0, 0.70, 770, 3),
    ])
    report = write_report(sweep)
    labels = [g.label for g in report["groups"]]
    assert labels == ["head only (frozen encoder)", "lora_qv", "lora_all_linear",
                      "full fine-tuning"]
    assert "±" not in report["table"]
    assert "±" not in report["md"].read_text()  # no promise of a spread that is not there
    assert report["png"].is_file()


@pytest.mark.parametrize(("config", "label"), [
    ({}, "LoRA query+value r=8"),
    ({"use_dora": True}, "LoRA query+value r=8 DoRA"),
    ({"use_rslora": True}, "LoRA query+value r=8 rsLoRA"),
    ({"loraplus_lr_ratio": 16}, "LoRA query+value r=8 LoRA+ ratio=16"),
    ({"use_dora": True, "use_rslora": True, "loraplus_lr_ratio": 2.5},
     "LoRA query+value r=8 DoRA rsLoRA LoRA+ ratio=2.5"),
    ({"init": "gradient"}, "LoRA query+value r=8 gradient init"),
    ({"init": "kaiming"}, "LoRA query+value r=8"),
])
def test_a_run_label_names_what_differs_from_plain_lora(config, label):
    from lora_lightning.app.report import lora_variant

    result = _result("lora_qv", "lora", 8, 0, 0.75, 74_498, 0)
    result.update(targets="query,value", variant=lora_variant({"r": 8, **config}))
    assert [g.label for g in group_results([result])] == [label]


def test_a_lora_option_with_a_label_is_named_by_it_not_by_its_target_list():
    # lora=all_linear_emb lists its layers by name; its label says what they amount to.
    named = _result("lora_all_linear_emb", "lora", 8, 0, 0.7, 579_794, 0)
    named.update(targets="query,key,value,dense,word_embeddings",
                 label="LoRA all-linear+embeddings")
    plain = _result("lora_qv", "lora", 8, 1, 0.7, 74_498, 1)
    plain.update(targets="query,value", label=None)
    labels = [g.label for g in group_results([named, plain])]
    assert labels == ["LoRA query+value r=8", "LoRA all-linear+embeddings r=8"]


def test_lora_runs_of_different_targets_are_not_a_rank_series():
    # full_vs_lora: q,v at r=8 beside all-linear at r=64 with the gradient init. Distinct
    # ranks alone would read as a rank sweep ("r=8", "r=64") and hide what each run adapts.
    from lora_lightning.app.report import lora_variant

    qv = _result("lora_qv", "lora", 8, 0, 0.77, 74_498, 1)
    qv.update(targets="query,value", label=None)
    r64 = _result("lora_all_linear_r64", "lora", 64, 0, 0.79, 2_654_978, 2)
    r64.update(targets="all-linear", label=None,
               variant=lora_variant({"use_rslora": True, "init": "gradient"}))
    labels = [g.label for g in group_results([qv, r64])]
    assert labels == ["LoRA query+value r=8", "LoRA all-linear r=64 rsLoRA gradient init"]


def test_a_rank_series_label_names_the_variant_too():
    from lora_lightning.app.report import lora_variant

    results = [_result(f"rank_{r}", "lora", r, 0, 0.7, 1000 * r, r) for r in (4, 8)]
    for r in results:
        r["variant"] = lora_variant({"use_dora": True})
    assert [g.label for g in group_results(results)] == ["r=4 DoRA", "r=8 DoRA"]
    assert lora_variant(None) == "" and lora_variant({"use_dora": False}) == ""


def test_same_run_with_other_overrides_is_its_own_group_named_by_them(tmp_path):
    # full_split: LoRA trained for 2 and for 3 epochs, three seeds each, beside full FT.
    results, job = [], 0
    for seed in (0, 1, 2):
        for epochs, acc in ((2, 0.81), (3, 0.82)):
            r = _result("lora_all_linear", "lora", 8, seed, acc + seed / 100, 332_546, job)
            r["overrides"] = [f"seed={seed}", "lora=all_linear", f"trainer.max_epochs={epochs}"]
            results.append(r)
            job += 1
        results.append(_result("full_ft", "full", None, seed, 0.83, TOTAL, job))
        job += 1
    report = write_report(_write(tmp_path / "s", results))
    labels = [g.label for g in report["groups"]]
    assert labels == ["lora_all_linear [trainer.max_epochs=2]",
                      "lora_all_linear [trainer.max_epochs=3]", "full fine-tuning"]
    assert all(g.seeds == [0, 1, 2] for g in report["groups"])
    rows = list(csv.DictReader(report["csv"].open()))
    assert {row["overrides"] for row in rows if row["run"] == "lora_all_linear" and
            row["seed"] == "1"} == {"seed=1 lora=all_linear trainer.max_epochs=2",
                                    "seed=1 lora=all_linear trainer.max_epochs=3"}


def test_table_without_a_shared_test_split_gives_size_and_majority_per_row(tmp_path):
    small = _result("lora_qv", "lora", 8, 0, 0.74, 74_498, 1)
    small.update(test_size=50, test_majority_acc=0.6)
    sweep = _write(tmp_path / "s", [_result("full_ft", "full", None, 0, 0.77, TOTAL, 0), small])
    report = write_report(sweep)
    header = report["table"].splitlines()[0]
    assert "test n" in header and "majority" in header
    row = next(line for line in report["table"].splitlines() if "lora_qv" in line)
    assert [c.strip() for c in row.split("|")[4:7]] == ["0.7400", "50", "0.600"]
    assert "only 50 samples" in report["md"].read_text()  # the tiny test split is flagged


def test_plot_spans_from_the_majority_floor_to_one(multi_seed_sweep, monkeypatch):
    import matplotlib.axes

    seen = []
    original = matplotlib.axes.Axes.set_ylim

    def spy(self, *args, **kwargs):
        if len(args) == 2:
            seen.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylim", spy)
    lines = []
    original_axhline = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                        lambda self, y, **kw: lines.append((y, kw.get("label"))) or
                        original_axhline(self, y, **kw))
    write_report(multi_seed_sweep)
    assert seen and seen[-1][1] == 1.0 and seen[-1][0] == pytest.approx(0.566 - 0.05)
    assert (0.566, "majority class (0.566): the floor") in lines


def test_no_results_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="no result.json"):
        load_results(tmp_path)
    with pytest.raises(ReportError, match="not a directory"):
        load_results(tmp_path / "missing")
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "result.json").write_text("{not json")
    with pytest.raises(ReportError, match="cannot read"):
        load_results(tmp_path)


def test_cli_prints_table_and_tensorboard_command(multi_seed_sweep, capsys):
    assert main([str(multi_seed_sweep), "--out", str(multi_seed_sweep / "report")]) == 0
    out = capsys.readouterr().out
    assert "| r=4" in out
    assert "tensorboard --logdir /logs/tb" in out
    assert "test acc is plain accuracy" in out
    assert (multi_seed_sweep / "report" / "sweep.png").is_file()


def test_cli_as_a_module_fails_cleanly_on_an_empty_dir(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lora_lightning.app.report", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "no result.json" in proc.stderr and "Traceback" not in proc.stderr


def test_hydra_callback_writes_the_report_after_a_multirun(multi_seed_sweep, capsys):
    config = OmegaConf.create({"name": "rank_sweep", "hydra": {"sweep": {"dir": str(multi_seed_sweep)}}})
    SweepReport().on_multirun_end(config)
    assert (multi_seed_sweep / "sweep.md").read_text().startswith("# rank_sweep")
    assert "tensorboard --logdir" in capsys.readouterr().out


def test_hydra_callback_only_warns_when_every_job_failed(tmp_path, caplog):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    SweepReport().on_multirun_end(config)
    assert "No sweep report" in caplog.text
    assert not (tmp_path / "sweep.md").exists()
