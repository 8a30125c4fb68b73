"""``RunRecorder``: measure one training run and give every run the same tags.

Runs with the LoRA callback log ``lora/trainable_params``, ``lora/total_params`` and
``lora/trainable_ratio`` from it. Full fine-tuning and head-only runs have no such
callback, so this one logs the same tags for them, and TensorBoard lines them all up.
For every run it writes one complete set of hparams first (the module's, the data's,
``lora/*`` with neutral values such as ``lora/r = 0`` where there is no adapter, and the
app's ``run``, ``kind``, ``lr``, ``run_seed``), then logs the fit's wall time and the run's
peak memory.

Peak memory on a CPU is the process's resident-set high-water mark, which the kernel
only ever raises: a second run in the same process (a sequential sweep, or a reused
joblib worker) would report the first run's peak. On Linux the mark is reset at fit start
through ``/proc/self/clear_refs``, so each run reports its own peak (which still includes
whatever the process already held). On a GPU it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lora_lightning.params import count_parameters

# What the LoRA callback logs as hparams, with the values a run without adapters gets.
NEUTRAL_LORA_HPARAMS: dict[str, Any] = {
    "lora/r": 0,
    "lora/alpha": 0.0,
    "lora/targets": "none",
    "lora/scaling": "none",
    "lora/dora": False,
    "lora/modules": 0,
}


def reset_peak_memory(device: torch.device) -> bool:
    """Reset the peak-memory mark that :func:`peak_memory_mb` reads; False if impossible."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Linux >= 4.0: reset the peak resident set size
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or else this process's peak RSS, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as handle:
            found = re.search(r"^VmHWM:\s+(\d+)\s+kB", handle.read(), re.MULTILINE)
        if found:
            return int(found.group(1)) / 1024
    except OSError:
        pass
    try:
        import resource
        import sys
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class RunRecorder(Callback):
    """Log a run's parameter counts, hparams, wall time and peak memory.

    Args:
        run_name: the run's label (hparam ``run``).
        kind: ``"lora"``, ``"full"`` or ``"head_only"`` (hparam ``kind``).
        hparams: more flat hparams for every logger (e.g. ``lr``, ``run_seed``).

    Put it before a ``LoRACallback`` in ``Trainer(callbacks=...)``: TensorBoard keeps a
    run's first hparams record, and this callback's holds the LoRA callback's too.

    After ``fit``, :attr:`results` holds ``trainable_params``, ``total_params``,
    ``trainable_ratio``, ``fit_seconds`` and ``peak_mem_mb``.
    """

    def __init__(
        self, run_name: str, kind: str, hparams: Mapping[str, Any] | None = None
    ) -> None:
        self.run_name = run_name
        self.kind = kind
        self.hparams = dict(hparams or {})
        self.results: dict[str, Any] = {}
        self._start = 0.0

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        reset_peak_memory(pl_module.device)
        self._start = time.perf_counter()
        if trainer.global_rank != 0:
            return
        # TensorBoard's HPARAMS view keeps the first hparams written to a run. Lightning
        # writes the module's right after on_fit_start and the LoRA callback its own in
        # on_fit_start; the app puts this callback before the LoRA callback, so this
        # complete set comes first.
        params = self._all_hparams(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    def _all_hparams(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        from lora_lightning.callback import LoRACallback
        from lora_lightning.summary import hparams_for, module_hparams

        params = module_hparams(trainer, pl_module)  # what Lightning logs itself
        params.update(NEUTRAL_LORA_HPARAMS)
        for callback in trainer.callbacks:
            if isinstance(callback, LoRACallback) and callback.report is not None:
                params.update(hparams_for(callback.config, callback.report))
        params.update({"run": self.run_name, "kind": self.kind, **self.hparams})
        return params

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counts = count_parameters(pl_module)
        self.results.update(
            trainable_params=counts.trainable,
            total_params=counts.total,
            trainable_ratio=counts.ratio,
        )
        if trainer.global_rank != 0:
            return
        from lora_lightning.callback import LoRACallback

        if any(isinstance(cb, LoRACallback) for cb in trainer.callbacks):
            return  # it logs these tags itself
        from lora_lightning.summary import metrics_for

        metrics = metrics_for(counts)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.results["fit_seconds"] = time.perf_counter() - self._start
        self.results["peak_mem_mb"] = peak_memory_mb(pl_module.device)
        if trainer.global_rank != 0:
            return
        metrics = {
            "perf/fit_seconds": self.results["fit_seconds"],
            "perf/run_peak_mem_mb": self.results["peak_mem_mb"],
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
