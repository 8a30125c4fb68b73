"""The final-values view (no smoothing), the HParams rank text and zero-padded job folders."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf
from test_app_report import _result

from lora_lightning.app import final_values
from lora_lightning.app.dashboard import dashboard_url, rank_text
from lora_lightning.app.report import group_results


def _sweep() -> list[dict]:
    results = []
    for seed, (full, qv) in enumerate([(0.797, 0.783), (0.801, 0.779), (0.793, 0.787)]):
        results.append(_result("full_ft", "full", None, seed, full, 22_566_146, 3 * seed))
        results.append(_result("lora_qv", "lora", 8, seed, qv, 74_498, 3 * seed + 1))
        results.append(_result("head_only", "head_only", None, seed, 0.717, 770, 3 * seed + 2))
    for r in results:
        r["final_val_acc"] = r["test_acc"] - 0.02
    return results


def test_markdown_gives_logged_means_and_sd_over_seeds_in_the_report_order():
    groups = group_results(_sweep())
    table = final_values.markdown(groups)
    lines = table.splitlines()
    assert lines[0].startswith("| run | n | test accuracy | best validation accuracy | "
                               "final validation accuracy | trainable parameters |")
    rows = [line for line in lines[2:] if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| head only (frozen encoder)", "| lora_qv", "| full fine-tuning"]
    full = rows[-1].split(" | ")
    # mean 0.797, sample sd 0.004 of (0.797, 0.801, 0.793)
    assert full[1] == "3" and full[2] == "0.7970 ± 0.0040"
    assert full[4] == "0.7770 ± 0.0040"          # final val acc, logged, not smoothed
    assert full[5] == "22,566,146"               # equal in every seed: no "± 0"
    assert "mean ± one standard deviation" in table


def test_one_run_per_row_shows_plain_values_and_skips_metrics_nobody_has():
    results = _sweep()[:2]
    for r in results:
        del r["final_val_acc"]
    table = final_values.markdown(group_results(results))
    assert "final validation accuracy" not in table
    assert "| 0.7970 |" in table and "±" not in table.split("\n\n")[0]
    assert "one run per row" in table


def test_summary_is_nan_without_values_and_checkpoint_mb_comes_from_bytes():
    (group,) = group_results([_result("lora_qv", "lora", 8, 0, 0.78, 74_498, 0)])
    metric = next(m for m in final_values.METRICS if m.key == "checkpoint_mb")
    assert final_values.summary(group, metric) == (pytest.approx(74_498 * 12 / 1e6), 0.0, 1)
    missing = final_values.Metric("no_such_key", "nothing", ".1f")
    mean, sd, n = final_values.summary(group, missing)
    assert math.isnan(mean) and (sd, n) == (0.0, 0)
    assert final_values.cell(group, missing) == "n/a"


def test_bar_images_are_readable_rgb_one_per_metric():
    pytest.importorskip("matplotlib")
    groups = group_results(_sweep())
    images = final_values.bar_images(groups, majority=0.578)
    assert set(images) == {m.key for m in final_values.METRICS}
    for image in images.values():
        height, width, channels = image.shape
        assert channels == 3 and width >= 800 and height >= 200
    # Full fine-tuning's bar is drawn in its own colour (red), LoRA's in blue.
    flat = {tuple(px) for px in images["test_acc"].reshape(-1, 3)[::7]}
    assert (0xcc, 0x33, 0x11) in flat and (0x00, 0x77, 0xbb) in flat


@pytest.mark.parametrize(("rank", "text"), [(8, "008"), (64, "064"), (128, "128"), (0, "none"),
                                            (None, "none"), ("8", "none")])
def test_rank_text_reads_as_an_integer_and_sorts_numerically(rank, text):
    assert rank_text(rank) == text


def test_rank_texts_sort_like_numbers():
    ranks = [1, 2, 4, 8, 16, 32, 64, 128]
    assert sorted(rank_text(r) for r in ranks) == [rank_text(r) for r in ranks]


def test_job_folders_are_zero_padded_so_they_sort_in_run_order():
    import lora_lightning.train  # noqa: F401  (registers the resolver)

    names = [OmegaConf.create({"d": f"${{zpad:{n}}}_run"}).d for n in (0, 1, 2, 10, 11, 23)]
    assert names == ["00_run", "01_run", "02_run", "10_run", "11_run", "23_run"]
    assert sorted(names) == names


def test_dashboard_url_opens_custom_scalars_without_smoothing():
    assert dashboard_url() == "http://localhost:6006/#custom_scalars&_smoothingWeight=0"
    assert dashboard_url(6123).startswith("http://localhost:6123/#custom_scalars")
