"""Human-readable and logger-ready summaries of an injection."""

from __future__ import annotations

from torch import nn

from .config import LoRAConfig
from .inject import InjectionReport, lora_layers
from .params import trainable_megabytes


def summary_table(model: nn.Module, config: LoRAConfig, report: InjectionReport) -> str:
    """A small fixed-width table: targets by type, r, alpha, scaling, counts and size."""
    layers = lora_layers(model)
    ranks = sorted({m.r for m in layers.values()})
    alphas = sorted({m.lora_alpha for m in layers.values()})
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


def metrics_for(report: InjectionReport) -> dict[str, float]:
    """The scalars every logger receives."""
    p = report.params
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
