"""TensorBoard as the dashboard: start it on a finished sweep and read the tags back over HTTP.

This is what a browser gets: the same JSON data API TensorBoard's own frontend calls.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lora_lightning.app.dashboard import (
    COMPARISON_RUN,
    FINAL_IMAGE_PREFIX,
    FINAL_TEXT_TAG,
    LAYOUT_CATEGORY,
    SWEEP_IMAGE_TAG,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(port: int, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data,
        headers={"Content-Type": "application/json"} if data else {},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dash")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [sys.executable, "-m", "lora_lightning.train", "-m", "experiment=digits",
         "lora=conv,none", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (log_dir,) = (root / "outputs").rglob("tensorboard")
    return log_dir


@pytest.fixture(scope="module")
def tensorboard(finished_sweep):
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(finished_sweep),
         "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if len(_get(port, "/data/runs")) >= 3:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                pytest.fail(f"TensorBoard did not serve the runs: {server.stderr.read()[-2000:]}")
            time.sleep(1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_runs_and_scalars_are_served_without_a_placeholder(tensorboard, finished_sweep):
    runs = _get(tensorboard, "/data/runs")
    # No stray runs ('.', 'sweep_report'): the jobs, zero-padded, and the comparison run,
    # written first (TensorBoard lists runs by their first event, and colours them so).
    assert runs == [COMPARISON_RUN, "00_lora_conv", "01_full_ft"], runs
    tags = _get(tensorboard, "/data/plugin/scalars/tags")
    for run in ("00_lora_conv", "01_full_ft"):
        assert {"val/acc", "val/loss", "train/loss", "perf/samples_per_sec",
                "perf/peak_tensor_mb", "perf/train_gflops_per_step", "hparams/test_acc",
                "hparams/checkpoint_mb"} <= set(tags[run])
        assert "hp_metric" not in tags[run]
        # A cost is a line (first and last step), not a lone point the chart may drop.
        points = _get(tensorboard, f"/data/plugin/scalars/scalars?run={run}"
                                   "&tag=perf/peak_tensor_mb")
        assert len(points) == 2 and points[0][2] == points[1][2] > 0
        for tag in ("lora/trainable_ratio", "perf/samples_per_sec"):
            points = _get(tensorboard, f"/data/plugin/scalars/scalars?run={run}&tag={tag}")
            assert len(points) >= 2, (run, tag, points)
    result = json.loads(next(finished_sweep.parent.rglob("00_lora_conv/result.json")).read_text())
    served = _get(tensorboard, "/data/plugin/scalars/scalars?run=00_lora_conv&tag=hparams/test_acc")
    assert served[-1][2] == pytest.approx(result["test_acc"], abs=1e-6)


def test_custom_scalars_layout_puts_full_and_lora_side_by_side(tensorboard):
    layout = _get(tensorboard, "/data/plugin/custom_scalars/layout")
    (category,) = [c for c in layout["category"] if c["title"] == LAYOUT_CATEGORY]
    tags = [t for chart in category["chart"] for t in chart["multiline"]["tag"]]
    for tag in ("^val/acc$", "^val/loss$", "^train/loss$", "^perf/samples_per_sec$",
                "^perf/peak_tensor_mb$"):
        assert tag in tags


def test_hparams_tab_has_real_metrics_and_shows_what_differs(tensorboard):
    experiment = _get(tensorboard, "/data/plugin/hparams/experiment", {"experimentName": ""})
    names = [h["name"] for h in experiment["hparamInfos"]]
    # What tells the runs apart comes first (TensorBoard ticks only the first few).
    assert names == ["kind", "lora/r", "lora/targets", "lr", "run_seed"], names
    # digits_cnn trains every kind at lr 1e-2, and both runs have seed 0.
    assert [h["differs"] for h in experiment["hparamInfos"]] == [True, True, True, False, False]
    metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"hparams/test_acc", "hparams/best_val_acc", "hparams/trainable_ratio",
            "hparams/samples_per_sec", "hparams/peak_tensor_mb",
            "hparams/checkpoint_mb"} <= metrics
    assert "hp_metric" not in metrics and "epoch" not in metrics
    # Every run is a session with values for those columns and metrics.
    groups = _get(tensorboard, "/data/plugin/hparams/session_groups", {
        "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
        "colParams": [{"hparam": "lora/r"}, {"metric": {"tag": "hparams/test_acc"}}],
        "startIndex": 0, "sliceSize": 100,
    })
    # A string that reads as an integer and sorts as one (a number would print 8.0000).
    ranks = sorted(g["hparams"]["lora/r"] for g in groups["sessionGroups"])
    assert ranks == ["008", "none"]
    (r_info,) = [h for h in experiment["hparamInfos"] if h["name"] == "lora/r"]
    assert r_info["type"] == "DATA_TYPE_STRING"
    assert all(g["metricValues"][0]["value"] > 0.5 for g in groups["sessionGroups"])


def test_sweep_plot_is_an_image_in_tensorboard(tensorboard):
    images = _get(tensorboard, "/data/plugin/images/tags")
    assert images[COMPARISON_RUN][SWEEP_IMAGE_TAG]["samples"] == 1


def test_final_values_are_images_and_a_text_table(tensorboard, finished_sweep):
    images = _get(tensorboard, "/data/plugin/images/tags")[COMPARISON_RUN]
    for key in ("test_acc", "best_val_acc", "final_val_acc", "trainable_params",
                "checkpoint_mb", "peak_tensor_mb", "fit_seconds", "train_gflops_per_step"):
        assert images[FINAL_IMAGE_PREFIX + key]["samples"] == 1, key
    (entry,) = _get(tensorboard, "/data/plugin/images/images?run=comparison"
                                 "&tag=final/test_acc&sample=0")
    url = f"http://127.0.0.1:{tensorboard}/data/plugin/images/individualImage?{entry['query']}"
    with urllib.request.urlopen(url, timeout=30) as response:
        png = response.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") >= 800  # width: readable, not a thumbnail
    tag = f"{FINAL_TEXT_TAG}/text_summary"  # torch.utils.tensorboard adds the suffix
    text = _get(tensorboard, f"/data/plugin/text/text?run={COMPARISON_RUN}&tag={tag}")
    html = text[-1]["text"]
    result = json.loads(next(finished_sweep.parent.rglob("00_lora_conv/result.json")).read_text())
    assert "<table>" in html and f"{result['test_acc']:.4f}" in html
