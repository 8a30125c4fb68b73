"""TensorBoard as the comparison dashboard: "full fine-tuning or LoRA?" at a glance.

Three things go into the log dir that every run of one command shares:

- a **custom-scalars layout** (TensorBoard's ``custom_scalars`` plugin, written once into
  the log dir itself): one chart per question with every run as a line, side by side:
  validation accuracy and loss, training loss, throughput, memory, FLOPs;
- per run, the **HParams** record written when the run ends, with real metrics
  (:data:`HPARAM_METRICS`: test accuracy, best validation accuracy, trainable ratio,
  samples/s, peak tensor memory, FLOPs, checkpoint size) beside ``lr``, ``lora/r`` and
  ``lora/targets``; each metric is logged at the first and the last step, so it draws
  as a line, not a lone point;
- after a sweep, the report's plot as an **image** (run ``sweep_report``, tag
  ``sweep/test_acc_vs_trainable_params``), and the HParams columns: the hparams that
  tell the runs apart and the metrics above (:func:`write_experiment`).

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
    "trainable parameters (ratio)": [r"^lora/trainable_ratio$"],
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
SWEEP_RUN = "sweep_report"
SWEEP_IMAGE_TAG = "sweep/test_acc_vs_trainable_params"


def write_layout(log_dir: str | Path) -> None:
    """Write the custom-scalars layout into ``log_dir`` (the folder holding the runs)."""
    from torch.utils.tensorboard import SummaryWriter

    if any(Path(log_dir).glob("events.out.tfevents.*.layout")):
        return  # written by an earlier run of this command
    layout = {LAYOUT_CATEGORY: {title: ["Multiline", tags]
                                for title, tags in LAYOUT_CHARTS.items()}}
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    with SummaryWriter(log_dir=str(log_dir), filename_suffix=".layout") as writer:
        writer.add_custom_scalars(layout)


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
METRIC_NAMES: dict[str, str] = {
    "hparams/test_acc": "test acc (plain)",
    "hparams/best_val_acc": "best val acc (plain)",
    "hparams/trainable_ratio": "trainable ratio",
    "hparams/samples_per_sec": "training samples/s",
    "hparams/peak_tensor_mb": "peak tensor MB",
    "hparams/train_gflops_per_step": "GFLOPs/step",
    "hparams/checkpoint_mb": "checkpoint MB",
}


def write_experiment(log_dir: str | Path, results: list[dict[str, Any]]) -> None:
    """After a sweep: the HParams tab's columns, ``lr``, ``lora/r``, ``lora/targets`` ...

    Without this record TensorBoard lists every hparam and every scalar tag and ticks
    only the first few, alphabetically, so ``lr`` and ``lora/targets`` start hidden and
    ``epoch`` comes first among the metrics. This one (run ``.``, the log dir itself)
    names the few hparams that tell the runs apart and the :data:`METRIC_NAMES`.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
    from torch.utils.tensorboard import SummaryWriter

    infos = []
    for key, name in SWEEP_HPARAMS.items():
        values = {str(r.get(key)) for r in results}
        numeric = key in ("lr", "rank", "seed")
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
    with SummaryWriter(log_dir=str(log_dir), filename_suffix=".experiment") as writer:
        writer._get_file_writer().add_summary(summary)


def add_sweep_image(log_dir: str | Path, png: str | Path) -> None:
    """Put the sweep report's plot into TensorBoard's Images tab (run ``sweep_report``)."""
    import matplotlib.image
    from torch.utils.tensorboard import SummaryWriter

    image = matplotlib.image.imread(str(png))[..., :3]  # RGB floats in [0, 1], HWC
    with SummaryWriter(log_dir=str(Path(log_dir) / SWEEP_RUN)) as writer:
        writer.add_image(SWEEP_IMAGE_TAG, image, dataformats="HWC")
