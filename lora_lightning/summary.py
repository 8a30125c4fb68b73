"""Human-readable and logger-ready summaries of an injection: the one place that builds the
summary table, the ``lora/*`` scalars and hparams, and the merged hparams record."""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import LoRAConfig
from .inject import InjectionReport, lora_layers
from .params import ParamCount, trainable_megabytes


def summary_table(model: nn.Module, config: LoRAConfig, report: InjectionReport) -> str:
    """A small fixed-width table: targets by type, r, alpha, scaling, counts and size."""
    layers = lora_layers(model)
    ranks = sorted({m.r for m in layers.values()})
    alphas = sorted({m.alpha for m in layers.values()})
    scales = sorted({round(m.scaling, 6) for m in layers.values()})
    p = report.params
    rows = [
        ("targets", ", ".join(f"{n} {t}" for t, n in sorted(report.by_type.items()))),
        ("modules", f"{len(layers)}"),
        ("r", ", ".join(map(str, ranks))),
        ("alpha", ", ".join(f"{a:g}" for a in alphas)),
        ("scaling", f"{', '.join(f'{s:g}' for s in scales)} ({config.scaling_rule})"),
        ("dora", str(config.use_dora)),
        ("trainable", f"{p.trainable:,}"),
        ("total", f"{p.total:,}"),
        ("ratio", f"{100 * p.ratio:.3f}%"),
        ("adapter size", f"{trainable_megabytes(model):.2f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["LoRA summary", "-" * (width + 40)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def metrics_for(counts: InjectionReport | ParamCount) -> dict[str, float]:
    """The ``lora/*`` scalars every logger receives, from a report or plain counts (a run
    without adapters logs the same tags)."""
    p = counts.params if isinstance(counts, InjectionReport) else counts
    return {
        "lora/trainable_params": float(p.trainable),
        "lora/total_params": float(p.total),
        "lora/trainable_ratio": float(p.ratio),
    }


def hparams_for(config: LoRAConfig, report: InjectionReport) -> dict[str, object]:
    """Flat hparams for TensorBoard's HPARAMS view."""
    targets = config.target_modules
    return {
        "lora/r": config.r,
        "lora/alpha": config.alpha,
        "lora/targets": targets if isinstance(targets, str) else ",".join(targets),
        "lora/scaling": config.scaling_rule,
        "lora/dora": config.use_dora,
        "lora/modules": len(report.ranks),
    }


def module_hparams(trainer: Any, pl_module: Any) -> dict[str, Any]:
    """The hparams Lightning itself logs at fit start: the module's, then the datamodule's.

    TensorBoard keeps only a run's first hparams record, so whoever logs first must log
    these too.
    """
    params: dict[str, Any] = {}
    if pl_module._log_hyperparams:
        params.update(pl_module.hparams_initial)
    datamodule = trainer.datamodule
    if datamodule is not None and datamodule._log_hyperparams:
        params.update(datamodule.hparams_initial)
    params.pop("_class_path", None)
    return params
