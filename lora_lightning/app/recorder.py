"""``RunRecorder``: measure one training run and give every run the same tags.

Runs with the LoRA callback log ``lora/trainable_params``, ``lora/total_params`` and
``lora/trainable_ratio`` from it. Full fine-tuning and head-only runs have no such
callback, so this one logs the same tags for them, and TensorBoard lines them all up.
For every run it writes one complete set of hparams first (the module's, the data's,
``lora/*`` with neutral values such as ``lora/r = 0`` where there is no adapter, and the
app's ``run``, ``kind``, ``lr``, ``run_seed``), then logs the fit's wall time and the run's
peak memory.

Costs of a run, measured on its first training step (forward, backward and optimizer
step) and logged at the first and the last step, so TensorBoard draws a line, not a dot
its outlier filter may hide:

- ``perf/train_gflops_per_step``: floating-point operations of forward + backward,
  counted by ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is 2 FLOPs).
  LoRA skips the weight gradients of the frozen layers, about a third of full training.
- ``perf/peak_tensor_mb``: live tensor bytes in training, the sum of parameters and
  buffers, gradients, optimizer state and the activations autograd saves for backward
  (each counted once per storage; frozen weights are parameters, not activations), with
  each part also logged under ``perf/tensor_mb/*``. This is where LoRA saves memory; the
  benchmarks measure the same quantity with the profiler.
- ``perf/run_peak_rss_mb``: the process's peak resident set, which also holds the
  Python runtime, libraries and allocator caches, so it moves far less.

Peak RSS on a CPU is the process's resident-set high-water mark, which the kernel
only ever raises: a second run in the same process (a sequential sweep, or a reused
joblib worker) would report the first run's peak. On Linux the mark is reset at fit start
through ``/proc/self/clear_refs``, so each run reports its own peak (which still includes
whatever the process already held). On a GPU it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.flop_counter import FlopCounterMode
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


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` that also counts in-place ``addmm_`` (as ``addmm``).

    torch's counter knows ``addmm`` but not its in-place form, which the LoRA layers use
    to add the ``B`` product into the base output; uncounted, the LoRA path would look
    half as dear as it is.
    """
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flop})


def _addmm_flop(self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``self + a @ b`` from the shapes (FlopCounterMode passes shapes)."""
    m, k = a_shape
    return 2 * m * k * b_shape[1]


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> tuple[int, set[int]]:
    """Bytes of the distinct storages behind ``tensors``, and their data pointers."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()), set(seen)


class StepCosts:
    """FLOPs and live tensor bytes of one training step, between two Lightning hooks."""

    def __init__(self) -> None:
        self._flops: FlopCounterMode | None = None
        self._saved_hooks: Any = None
        self._saved: dict[int, int] = {}
        self._skip: set[int] = set()

    def start(self, pl_module: LightningModule) -> None:
        _, self._skip = _storage_bytes([*pl_module.parameters(), *pl_module.buffers()])

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in self._skip:
                    self._saved[storage.data_ptr()] = storage.nbytes()
            return t

        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._saved_hooks.__enter__()
        self._flops = flop_counter()
        self._flops.__enter__()

    def stop(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        if self._flops is None:
            return {}
        self._flops.__exit__(None, None, None)
        self._saved_hooks.__exit__(None, None, None)
        flops, self._flops = self._flops.get_total_flops(), None
        params, _ = _storage_bytes([*pl_module.parameters(), *pl_module.buffers()])
        grads, _ = _storage_bytes(p.grad for p in pl_module.parameters() if p.grad is not None)
        state = [
            t for opt in trainer.optimizers for s in opt.state.values() for t in s.values()
        ]
        optimizer, _ = _storage_bytes(state)
        activations = sum(self._saved.values())
        mb = 2**20
        return {
            "train_gflops_per_step": flops / 1e9,
            "peak_tensor_mb": (params + grads + optimizer + activations) / mb,
            "tensor_params_mb": params / mb,
            "tensor_grads_mb": grads / mb,
            "tensor_optimizer_mb": optimizer / mb,
            "tensor_activations_mb": activations / mb,
        }

    def abort(self) -> None:
        if self._flops is not None:
            self._flops.__exit__(None, None, None)
            self._saved_hooks.__exit__(None, None, None)
            self._flops = None


COST_TAGS = {
    "train_gflops_per_step": "perf/train_gflops_per_step",
    "peak_tensor_mb": "perf/peak_tensor_mb",
    "tensor_params_mb": "perf/tensor_mb/params",
    "tensor_grads_mb": "perf/tensor_mb/grads",
    "tensor_optimizer_mb": "perf/tensor_mb/optimizer",
    "tensor_activations_mb": "perf/tensor_mb/activations",
}


class RunRecorder(Callback):
    """Log a run's parameter counts, hparams, wall time and peak memory.

    Args:
        run_name: the run's label (hparam ``run``).
        kind: ``"lora"``, ``"full"`` or ``"head_only"`` (hparam ``kind``).
        hparams: more flat hparams for every logger (e.g. ``lr``, ``run_seed``).

    Put it before a ``LoRACallback`` in ``Trainer(callbacks=...)``: TensorBoard keeps a
    run's first hparams record, and this callback's holds the LoRA callback's too.

    After ``fit``, :attr:`results` holds ``trainable_params``, ``total_params``,
    ``trainable_ratio``, ``fit_seconds``, ``peak_rss_mb``, ``train_gflops_per_step``,
    ``peak_tensor_mb`` and its parts ``tensor_{params,grads,optimizer,activations}_mb``.
    """

    def __init__(
        self, run_name: str, kind: str, hparams: Mapping[str, Any] | None = None
    ) -> None:
        self.run_name = run_name
        self.kind = kind
        self.hparams = dict(hparams or {})
        self.results: dict[str, Any] = {}
        self._start = 0.0
        self._costs = StepCosts()
        self._measured = False
        self.logged_hparams: dict[str, Any] = {}

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
        self.logged_hparams = params
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    def _all_hparams(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        from lora_lightning.lightning.callback import LoRACallback
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
        from lora_lightning.lightning.callback import LoRACallback

        if any(isinstance(cb, LoRACallback) for cb in trainer.callbacks):
            return  # it logs these tags itself
        from lora_lightning.summary import metrics_for

        metrics = metrics_for(counts)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._measured:
            self._costs.start(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        if self._measured:
            return
        self._measured = True
        self.results.update(self._costs.stop(trainer, pl_module))
        self._log_costs(trainer, step=0)

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._costs.abort()

    def _log_costs(self, trainer: Trainer, step: int) -> None:
        if trainer.global_rank != 0:
            return
        metrics = {tag: float(self.results[key]) for key, tag in COST_TAGS.items()
                   if self.results.get(key) is not None}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.results["fit_seconds"] = time.perf_counter() - self._start
        self.results["peak_rss_mb"] = peak_memory_mb(pl_module.device)
        if trainer.global_rank != 0:
            return
        metrics = {
            "perf/fit_seconds": self.results["fit_seconds"],
            "perf/run_peak_rss_mb": self.results["peak_rss_mb"],
        }
        if "trainable_params" in self.results:  # again at the last step: a line, not a dot
            from lora_lightning.params import ParamCount
            from lora_lightning.summary import metrics_for

            counts = ParamCount(self.results["trainable_params"], self.results["total_params"],
                                self.results["trainable_ratio"])
            for logger in trainer.loggers:
                logger.log_metrics(metrics_for(counts), step=trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)  # a line from the first to the last step,
            logger.log_metrics(metrics, step=trainer.global_step)  # not a lone dot
        if trainer.global_step > 0:
            self._log_costs(trainer, step=trainer.global_step)
