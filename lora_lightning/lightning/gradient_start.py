"""``LoRAConfig(init="gradient")`` in a Lightning run: ``A`` from the first step's gradient.

:class:`~lora_lightning.gradient_init.GradientInit` does the math; this module decides
when, on the trainer's terms:

* at the first training batch (``on_train_batch_start``) the adapted weights start
  requiring grad, so the module's own ``training_step`` and backward compute their
  gradient, with no extra forward and no second call of the user's code (whose logging
  would count twice);
* at the first ``on_before_optimizer_step`` (after every accumulated micro-batch and
  DDP's gradient averaging, before clipping and the step) the weight gradients are
  averaged over ranks, divided by a GradScaler's scale, turned into ``A``, and ``B`` gets
  the gradient of the new ``A``; an overflowing float16 step is skipped and the next one
  tried;
* never twice: not when the adapter has trained (any ``B`` not zero: a resumed run, a
  second ``fit``), and the callback's checkpoint state records that it ran;
* optionally after ``wait`` optimizer steps in which the adapters do not train (their
  gradients are dropped, so the optimizer skips them) while the rest trains: a new
  classifier head (``modules_to_save``) starts random, and the gradient it sends into the
  encoder at step 0 points along its random weights; a few steps later it points along
  what tells the classes apart. The same as training the head alone first (LP-FT),
  inside one run. (Measured once, it lost: waiting the 20 warmup steps of the recipe
  scored 2 points below no wait on the speeches, seed 0; ``experiments/recipe``.)

Sharded strategies (FSDP, DeepSpeed, model parallel) hold each weight's gradient in
shards; the init is refused there before any change.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from ..errors import ArgumentError, ConfigError
from ..gradient_init import GradientInit, GradientInitReport, gradient_init_reason
from ..registry import lora_layers

SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def _trained(pl_module: LightningModule, adapter: str) -> bool:
    """Whether any layer the init would set has a ``B`` that is not zero (an embedding's
    ``B`` starts random: it says nothing)."""
    return any(bool(m._ab(adapter)[1].any()) for m in lora_layers(pl_module).values()
               if adapter in m.lora_specs and gradient_init_reason(m, adapter) is None)


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, src=0)
    return t


class FirstStepInit:
    """The first-step gradient init for one callback (its state is :attr:`done`)."""

    def __init__(self, adapter: str, wait: int = 0) -> None:
        self.adapter = adapter
        self.wait = wait
        self.done = False
        self.report: GradientInitReport | None = None
        self._init: GradientInit | None = None

    def batch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.done or self._init is not None or trainer.global_step < self.wait:
            return
        if _trained(pl_module, self.adapter):
            self.done = True
            rank_zero_info(f"LoRA: init='gradient' skipped: adapter {self.adapter!r} has "
                           "trained already (B is not zero), so its A is kept.")
            return
        strategy = type(trainer.strategy)
        if any(c.__name__ in SHARDED for c in strategy.__mro__):
            raise ConfigError("init", "gradient", (
                f"the trainer's strategy is {strategy.__name__}, which shards each weight's "
                "gradient, and the gradient init needs every adapted weight's whole gradient; "
                "use init='kaiming' with a sharded strategy, or strategy='ddp'"))
        self._init = GradientInit(pl_module, self.adapter)
        self._init.start()

    def before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        init = self._init
        if init is None:
            if not self.done and trainer.global_step < self.wait:
                for layer in lora_layers(pl_module).values():  # the adapters wait
                    if self.adapter in layer.lora_specs:
                        for p in layer._ab(self.adapter):
                            p.grad = None
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        try:
            report = init.finish(
                reduce=lambda t: trainer.strategy.reduce(t, reduce_op="mean"),
                grad_scale=scale, broadcast=_broadcast)
        except ArgumentError as err:
            if err.argument != "gradient":
                raise
            init.cancel()  # a float16 overflow: the scaler skips this step; try the next
            self._init = None
            rank_zero_info(f"LoRA: init='gradient' waits a step: {err}")
            return
        self._init, self.done, self.report = None, True, report
        rank_zero_info(f"LoRA: {report.summary()}.")

    def cancel(self) -> None:
        """Freeze the weights again if the step never came (an interrupted fit)."""
        if self._init is not None:
            self._init.cancel()
            self._init = None
