"""TensorBoard as the comparison dashboard: "full fine-tuning or LoRA?" at a glance.

The runs of one command share a log dir; besides them it holds one more run,
``comparison`` (:data:`COMPARISON_RUN`), written before the first run logs (so it takes
the first colour and the runs that follow get distinct ones: full fine-tuning, job 00 of
the demo, blue; LoRA red and cyan) and holding:

- a **custom-scalars layout** (TensorBoard's ``custom_scalars`` plugin): one chart per
  question with every run as a line, side by side: validation accuracy and loss, training
  loss, throughput, memory, FLOPs, trainable parameters, checkpoint size. Open it as
  :func:`dashboard_url` prints, with smoothing off;
- per run, the **HParams** record written when the run ends, with real metrics
  (:data:`HPARAM_METRICS`: test accuracy, best validation accuracy, trainable ratio,
  samples/s, peak tensor memory, FLOPs, checkpoint size) beside ``lr``, ``lora/r`` and
  ``lora/targets``; each metric is logged at the first and the last step, so it draws
  as a line, not a lone point;
- after a sweep (the report): the **final values** that smoothing cannot move, one bar
  chart per metric in Images (tags ``final/<metric>``) and a table in Text
  (:func:`add_final_values`, :mod:`lora_lightning.app.final_values`); the report's plot
  (tag ``sweep/test_acc_vs_trainable_params``); and the HParams columns: the hparams
  that tell the runs apart and the metrics above (:func:`write_experiment`).

In the HParams table ``lora/r`` is a 3-digit string (``008``, ``064``; ``none`` without
adapters): TensorBoard prints every number with five significant digits (``8.0000``),
and zero-padding keeps the string order numeric.

Read back what TensorBoard serves with ``tests/test_app_dashboard.py``, which starts
TensorBoard on a finished run and asks its HTTP data API for these tags.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

LAYOUT_CATEGORY = "full fine-tuning vs LoRA"
# chart title -> tag regexes; every run matching them is a line in that chart.
LAYOUT_CHARTS: dict[str, list[str]] = {
    "validation accuracy (plain)": [r"^val/acc$"],
    "validation loss": [r"^val/loss$"],
    "training loss": [r"^train/loss$"],
    "throughput (training samples/s)": [r"^perf/samples_per_sec$"],
    "peak tensor memory (MB): params + grads + optimizer + activations": [
        r"^perf/peak_tensor_mb$"
    ],
    "peak process RSS (MB)": [r"^perf/run_peak_rss_mb$"],
    "training GFLOPs per step": [r"^perf/train_gflops_per_step$"],
    "trainable parameters (count; the chart's log-scale button spreads them)": [
        r"^lora/trainable_params$"
    ],
    "checkpoint size (MB)": [r"^hparams/checkpoint_mb$"],
    "test accuracy (one value per run, drawn flat)": [r"^hparams/test_acc$"],
}
# result.json key -> the HParams tab's metric tag.
HPARAM_METRICS: dict[str, str] = {
    "test_acc": "hparams/test_acc",
    "best_val_acc": "hparams/best_val_acc",
    "trainable_ratio": "hparams/trainable_ratio",
    "samples_per_sec": "hparams/samples_per_sec",
    "peak_tensor_mb": "hparams/peak_tensor_mb",
    "train_gflops_per_step": "hparams/train_gflops_per_step",
    "checkpoint_mb": "hparams/checkpoint_mb",
}
COMPARISON_RUN = "comparison"
SWEEP_IMAGE_TAG = "sweep/test_acc_vs_trainable_params"
CURVES_IMAGE_TAG = "sweep/val_curves"
FINAL_IMAGE_PREFIX = "final/"
FINAL_TEXT_TAG = "final/values"


def dashboard_url(port: int = 6006) -> str:
    """The Custom Scalars page with smoothing off: TensorBoard reads the tab and
    ``_smoothingWeight`` from the URL's fragment."""
    return f"http://localhost:{port}/#custom_scalars&_smoothingWeight=0"


def write_layout(log_dir: str | Path) -> None:
    """Write the custom-scalars layout into ``log_dir``'s comparison run (once)."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(log_dir) / COMPARISON_RUN
    if any(run_dir.glob("events.out.tfevents.*.layout")):
        return  # written by an earlier run of this command
    layout = {LAYOUT_CATEGORY: {title: ["Multiline", tags]
                                for title, tags in LAYOUT_CHARTS.items()}}
    run_dir.mkdir(parents=True, exist_ok=True)
    with SummaryWriter(log_dir=str(run_dir), filename_suffix=".layout") as writer:
        writer.add_custom_scalars(layout)


def rank_text(rank: Any) -> str:
    """``lora/r`` as the HParams table shows it: ``008`` (sorts as numbers do), ``none``."""
    if isinstance(rank, bool) or not isinstance(rank, int | float) or not rank:
        return "none"
    return f"{int(rank):03d}"


def hparam_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The HParams tab's metrics of one run, from its ``result.json`` entries."""
    values = dict(result)
    if result.get("checkpoint_bytes") is not None:
        values["checkpoint_mb"] = result["checkpoint_bytes"] / 1e6
    out = {}
    for key, tag in HPARAM_METRICS.items():
        value = values.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            out[tag] = float(value)
    return out


def _plain(value: Any) -> bool | int | float | str:
    """An hparam value TensorBoard can show (numbers, strings, booleans; the rest as text)."""
    return value if isinstance(value, bool | int | float | str) else str(value)


def log_run(loggers: list[Any], hparams: dict[str, Any], result: dict[str, Any],
            last_step: int) -> None:
    """Write one run's HParams session (hparams + real metrics) to every TensorBoard logger.

    Only the session records are written, not an experiment record: with none, TensorBoard
    builds the experiment from every run's session, so it marks the hparams that differ
    between runs (``lr``, ``lora/r``, ``lora/targets`` ...) and shows those first, instead
    of the first run's list with nothing marked as differing.
    """
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    metrics = hparam_metrics(result)
    if not metrics:
        return
    params = {str(k): _plain(v) for k, v in hparams.items()}
    if "lora/r" in params:
        params["lora/r"] = rank_text(params["lora/r"])
    _, start, end = hparams_summaries(params, metrics)
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        writer = logger.experiment._get_file_writer()
        writer.add_summary(start, 0)
        writer.add_summary(end, last_step)
        logger.log_metrics(metrics, step=0)  # two points: a line TensorBoard always draws
        if last_step > 0:
            logger.log_metrics(metrics, step=last_step)
        logger.experiment.flush()


# The HParams tab's columns after a sweep: result.json key -> session hparam name.
SWEEP_HPARAMS: dict[str, str] = {
    "kind": "kind", "lr": "lr", "rank": "lora/r", "targets": "lora/targets", "seed": "run_seed",
}
# In this order: TensorBoard ticks the first five columns, so the comparison's numbers
# come first (trainable ratio and samples/s are one click away).
METRIC_NAMES: dict[str, str] = {
    "hparams/test_acc": "test acc (plain)",
    "hparams/best_val_acc": "best val acc (plain)",
    "hparams/checkpoint_mb": "checkpoint MB",
    "hparams/peak_tensor_mb": "peak tensor MB",
    "hparams/train_gflops_per_step": "GFLOPs/step",
    "hparams/trainable_ratio": "trainable ratio",
    "hparams/samples_per_sec": "training samples/s",
}


def write_experiment(log_dir: str | Path, results: list[dict[str, Any]]) -> None:
    """After a sweep: the HParams tab's columns, ``lr``, ``lora/r``, ``lora/targets`` ...

    Without this record TensorBoard lists every hparam and every scalar tag and ticks
    only the first few, alphabetically, so ``lr`` and ``lora/targets`` start hidden and
    ``epoch`` comes first among the metrics. This one (in the comparison run) names the
    few hparams that tell the runs apart and the :data:`METRIC_NAMES`; ``lr`` and
    ``run_seed`` are numbers, ``lora/r`` a zero-padded string (:func:`rank_text`).
    """
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
    from torch.utils.tensorboard import SummaryWriter

    infos = []
    for key, name in SWEEP_HPARAMS.items():
        values = {str(r.get(key)) for r in results}
        numeric = key in ("lr", "seed")
        infos.append(api_pb2.HParamInfo(
            name=name, differs=len(values) > 1,
            type=api_pb2.DATA_TYPE_FLOAT64 if numeric else api_pb2.DATA_TYPE_STRING,
        ))
    experiment = api_pb2.Experiment(
        hparam_infos=sorted(infos, key=lambda i: (not i.differs, i.name)),
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=name)
                      for tag, name in METRIC_NAMES.items()],
    )
    content = plugin_data_pb2.HParamsPluginData(experiment=experiment, version=0)
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name="hparams", content=content.SerializeToString()))
    summary = Summary(value=[Summary.Value(tag="_hparams_/experiment", metadata=metadata)])
    with SummaryWriter(log_dir=str(Path(log_dir) / COMPARISON_RUN),
                       filename_suffix=".experiment") as writer:
        writer._get_file_writer().add_summary(summary)


def add_sweep_image(log_dir: str | Path, png: str | Path, tag: str = SWEEP_IMAGE_TAG,
                    step: int = 0) -> None:
    """Put one of the sweep report's plots into TensorBoard's Images tab (the comparison
    run): the test accuracy against trainable parameters, or the validation curves."""
    import matplotlib.image
    from torch.utils.tensorboard import SummaryWriter

    image = matplotlib.image.imread(str(png))[..., :3]  # RGB floats in [0, 1], HWC
    with SummaryWriter(log_dir=str(Path(log_dir) / COMPARISON_RUN)) as writer:
        writer.add_image(tag, image, global_step=step, dataformats="HWC")


def add_final_values(log_dir: str | Path, groups: Any, majority: float | None = None,
                     step: int = 0) -> None:
    """The final values into the comparison run: one bar chart per metric in Images
    (``final/<metric>``), the table in Text (``final/values``). ``step``: the number of
    runs reported, so a report written again after more runs is the one shown."""
    from torch.utils.tensorboard import SummaryWriter

    from lora_lightning.app import final_values

    with SummaryWriter(log_dir=str(Path(log_dir) / COMPARISON_RUN),
                       filename_suffix=".final") as writer:
        for key, image in final_values.bar_images(groups, majority).items():
            writer.add_image(FINAL_IMAGE_PREFIX + key, image, global_step=step,
                             dataformats="HWC")
        writer.add_text(FINAL_TEXT_TAG, final_values.markdown(groups), global_step=step)
