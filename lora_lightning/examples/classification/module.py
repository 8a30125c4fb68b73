"""A LightningModule that trains any classifier ``nn.Module`` with cross-entropy.

Batches are dicts: ``labels`` is popped and every other entry is passed to the network
as a keyword argument, so the same module trains the MiniLM text classifier
(``input_ids``, ``attention_mask``) and the digits CNN (``pixel_values``).

The optimizer is built over the parameters with ``requires_grad=True`` only. Lightning
calls ``configure_optimizers`` after the callbacks' ``setup``, so a LoRA callback that
freezes the base model and injects adapters there is respected.

Logged metrics: ``train/loss`` (each step), ``val/loss``, ``val/acc``,
``val/balanced_acc``, ``test/loss``, ``test/acc``, ``test/balanced_acc``,
``perf/samples_per_sec`` (training samples so far in the epoch over the wall time from
the epoch's start to the last training batch, less any validation run inside the epoch;
logged every ``log_every_n_steps``), and once per training epoch ``perf/peak_mem_mb``
(peak CUDA memory allocated since ``fit`` started on a GPU; otherwise the process's peak
resident set size).

``acc`` is plain (micro) accuracy: correct predictions over all samples, the figure to
read against the majority-class rate. ``balanced_acc`` is the mean of the per-class
recalls (torchmetrics' ``average="macro"``, its default for multiclass accuracy), which
a model that always predicts the majority class scores ``1 / num_classes`` on.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from ..common import adamw_with_warmup, check_optimizer_args


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or else this process's peak RSS, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows has no `resource`
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class ClassifierModule(L.LightningModule):
    """Cross-entropy training, accuracy and throughput logging for a classifier network.

    Args:
        net: maps the batch's non-label entries (as keyword arguments) to logits.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the training steps over which the learning rate rises
            linearly from 0 to ``lr``. 0 disables warmup.
        num_classes: number of classes for accuracy; defaults to
            ``net.classifier.out_features``.
        decay: after the warmup, ``"constant"`` (the default) keeps ``lr``; ``"linear"``
            lowers it linearly to 0 at the last step (``trainer.max_steps``, or the
            epochs' steps).
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        num_classes: int | None = None,
        decay: str = "constant",
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"Expected `net` to be a torch.nn.Module but got {type(net).__name__}.")
        check_optimizer_args(lr, weight_decay, warmup_ratio, decay)
        if num_classes is None:
            num_classes = getattr(getattr(net, "classifier", None), "out_features", None)
            if num_classes is None:
                raise ValueError(
                    f"Cannot infer `num_classes`: {type(net).__name__} has no "
                    "`classifier.out_features`. Pass num_classes=... explicitly."
                )
        self.save_hyperparameters(ignore=["net"])
        self.hparams["num_classes"] = num_classes
        self.net = net
        # torchmetrics averages multiclass accuracy per class by default; `acc` is plain.
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_balanced_acc = MulticlassAccuracy(num_classes, average="macro")
        self.test_balanced_acc = MulticlassAccuracy(num_classes, average="macro")
        self._epoch_start = 0.0
        self._last_batch_end = 0.0
        self._val_seconds = 0.0
        self._pending_val_seconds = 0.0
        self._val_start = 0.0
        self._epoch_samples = 0

    @override
    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.net(**inputs)

    @staticmethod
    def _split_batch(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        if not isinstance(batch, dict) or "labels" not in batch:
            found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise KeyError(
                f"Expected a dict batch with a 'labels' entry but got {found}; the "
                "datamodule should yield e.g. {'pixel_values': ..., 'labels': ...}."
            )
        inputs = dict(batch)
        return inputs, inputs.pop("labels")

    def _loss_and_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        inputs, labels = self._split_batch(batch)
        logits = self.net(**inputs)
        return F.cross_entropy(logits, labels), logits, labels

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, labels = self._loss_and_logits(batch)
        self._epoch_samples += labels.size(0)
        self.log(
            "train/loss",
            loss,
            on_step=True,
            on_epoch=False,
            prog_bar=True,
            batch_size=labels.size(0),
        )
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        loss, logits, labels = self._loss_and_logits(batch)
        accuracy = self.val_acc if stage == "val" else self.test_acc
        balanced = self.val_balanced_acc if stage == "val" else self.test_balanced_acc
        accuracy(logits, labels)
        balanced(logits, labels)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=labels.size(0))
        self.log(f"{stage}/acc", accuracy, prog_bar=True, batch_size=labels.size(0))
        self.log(f"{stage}/balanced_acc", balanced, batch_size=labels.size(0))

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @override
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs = dict(batch)
        inputs.pop("labels", None)
        return self.net(**inputs).argmax(dim=-1)

    @override
    def configure_optimizers(self) -> Any:
        return adamw_with_warmup(self, self.net)

    # -- throughput and memory ------------------------------------------------------------

    @override
    def on_fit_start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @override
    def on_train_epoch_start(self) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()
        self._val_seconds = self._pending_val_seconds = 0.0
        self._epoch_samples = 0

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # A validation run that ended before this batch did ran inside the epoch.
        self._val_seconds += self._pending_val_seconds
        self._pending_val_seconds = 0.0
        self._last_batch_end = time.perf_counter()
        # Throughput so far this epoch, logged every log_every_n_steps (a curve, not a lone
        # end-of-epoch point); its last value covers the whole epoch.
        seconds = self._last_batch_end - self._epoch_start - self._val_seconds
        if self._epoch_samples and seconds > 0:
            self.log("perf/samples_per_sec", self._epoch_samples / seconds, on_step=True,
                     on_epoch=False)

    @override
    def on_validation_epoch_start(self) -> None:
        self._val_start = time.perf_counter()

    @override
    def on_validation_epoch_end(self) -> None:
        self._pending_val_seconds += time.perf_counter() - self._val_start

    @override
    def on_train_epoch_end(self) -> None:
        self.log("perf/peak_mem_mb", peak_memory_mb(self.device))
