"""``LoRACallback``: drop-in LoRA for an existing Lightning ``Trainer``.

Where each piece of work happens, and why (Lightning 2.x ``Trainer._run`` order: callback
``setup`` → module ``setup`` → ``configure_model`` → module ``on_load_checkpoint`` → strict
``load_state_dict`` → callback ``on_load_checkpoint`` → ``strategy.setup`` (wraps the
model, then ``configure_optimizers``) → ``on_fit_start`` → optimizer restore):

* **Injection** must see models built in ``__init__``, in ``LightningModule.setup`` and in
  ``configure_model``, and must precede ``configure_optimizers``. The callback's ``setup``
  runs too early, so it wraps this module instance's ``configure_model`` for one call:
  the wrapper runs the user's hook, injects, and removes itself.
* **Key reconciliation** must precede the strict load, which runs before any callback
  ``on_load_checkpoint`` (and callback hooks are skipped for checkpoints without a
  ``callbacks`` entry). So injection installs it: each LoRA layer's load hooks let its own
  adapter keys be missing (a base checkpoint loads), and the module's own
  ``on_save_checkpoint``/``on_load_checkpoint`` are wrapped to strip frozen base weights
  from adapter-only checkpoints, then validate and refill them on load. The module hook
  also runs under ``ModelCheckpoint(save_weights_only=True)``, where callback hooks do not.
* The same module hook checks that the state dict fits (keys, shapes) before Lightning's
  strict load, which would otherwise copy every tensor that fits and then raise, leaving
  the model half-loaded.
* The callback's own ``on_load_checkpoint`` only reports what was reconciled.
* **Checkpoint files**: ``setup`` makes the trainer's default ``TorchCheckpointIO``
  write atomically and read with clear errors (see ``checkpoint_io.py``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ..checkpoint.meta import SAVE_MODES
from ..config import LoRAConfig
from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    ConfigError,
    OptimizerCoverageError,
    TargetMatchError,
)
from ..inject import InjectionReport, inject_lora
from ..io.adapter_files import save_adapter
from ..io.atomic import write_file
from ..layers.base import DEFAULT_ADAPTER
from ..merge import merged_state_dict
from ..optim import b_factor_ids
from ..registry import check_name
from ..summary import hparams_for, metrics_for, module_hparams, summary_table
from .checkpoint_io import harden_checkpoint_io
from .gradient_start import FirstStepInit
from .module_hooks import HookState, configure_model_then_inject, load_hook, save_hook, wrap_hook

_UNSET: Any = object()


class LoRACallback(Callback):
    """Inject LoRA adapters at ``setup`` and keep checkpoints correct.

    Args:
        config: a :class:`LoRAConfig`, or a mapping of its fields.
        save_mode: ``"adapter"`` (default) stores only trained tensors and buffers in
            ``checkpoint["state_dict"]``, plus metadata; ``"full"`` keeps every weight.
            (``save=`` is the old, deprecated spelling.)
        export_adapter_dir: if set, save the adapter there (PEFT format) at fit end.
        export_merged_path: if set, ``torch.save`` a merged plain state dict there at fit
            end; it loads into the un-injected LightningModule with ``strict=True``.
        check_optimizer: at train start, fail if a trainable adapter tensor is in no
            optimizer.
        verbose: print the summary table at fit start (global rank zero only).
        adapter: train a named adapter on a model that may already carry others: they stay
            frozen and inactive, and checkpoints and exports hold only this adapter (and
            its own ``modules_to_save``). ``None`` (the default) trains the ``"default"``
            adapter and saves every trained tensor, as before named adapters existed.
        init_after_steps: with ``LoRAConfig(init="gradient")``, the adapters do not train
            for this many optimizer steps (everything else does, such as a new head in
            ``modules_to_save``); then ``A`` is set from that step's weight gradient. 0
            (the default) sets it at the first step.

    The module's ``configure_optimizers`` builds its optimizer from the tensors that require
    grad, best through :func:`~lora_lightning.optim.lora_param_groups`, which also applies
    LoRA+ when the config sets ``loraplus_lr_ratio`` (the callback warns at train start if
    the optimizer gives ``B`` no larger rate then).

    Example::

        class MyModule(LightningModule):
            def configure_optimizers(self):
                return torch.optim.AdamW(lora_param_groups(self, lr=1e-3))

        config = LoRAConfig(r=8, target_modules=["query", "value"], loraplus_lr_ratio=16)
        trainer = Trainer(callbacks=[LoRACallback(config)])
    """

    def __init__(
        self,
        config: LoRAConfig | Mapping[str, Any],
        save_mode: str = "adapter",
        export_adapter_dir: str | None = None,
        export_merged_path: str | None = None,
        check_optimizer: bool = True,
        verbose: bool = True,
        save: Any = _UNSET,
        adapter: str | None = None,
        init_after_steps: int = 0,
    ) -> None:
        argument = "save_mode"
        if save is not _UNSET:
            warnings.warn("LoRACallback(save=...) is deprecated; use save_mode=... (same "
                          "values).", DeprecationWarning, stacklevel=2)
            save_mode, argument = save, "save"
        if isinstance(config, Mapping):
            config = LoRAConfig.from_dict(dict(config))
        if not isinstance(config, LoRAConfig):
            raise ArgumentTypeError("LoRACallback", "config", config,
                                    "a LoRAConfig or a mapping of its fields")
        if save_mode not in SAVE_MODES:
            raise ArgumentError("LoRACallback", argument, save_mode,
                                f"expected one of {list(SAVE_MODES)}")
        self.config = config
        self.save_mode = save_mode
        self.adapter = None if adapter is None else check_name(adapter)
        self.hook_state = HookState(config, save_mode, adapter=self.adapter)
        self.export_adapter_dir = export_adapter_dir
        self.export_merged_path = export_merged_path
        self.check_optimizer = check_optimizer
        self.verbose = verbose
        self.report: InjectionReport | None = None
        self._printed = False
        if (isinstance(init_after_steps, bool) or not isinstance(init_after_steps, int)
                or init_after_steps < 0):
            raise ArgumentError("LoRACallback", "init_after_steps", init_after_steps,
                                "expected an integer >= 0 (optimizer steps before the "
                                "gradient init; 0 sets A at the first step)")
        if init_after_steps and config.init != "gradient":
            raise ArgumentError("LoRACallback", "init_after_steps", init_after_steps, (
                f"it delays LoRAConfig(init='gradient'), and this config has init="
                f"{config.init!r}; set init='gradient' or init_after_steps=0"))
        self.init_after_steps = init_after_steps
        self.first_step_init = (FirstStepInit(self.adapter or DEFAULT_ADAPTER, init_after_steps)
                                if config.init == "gradient" else None)

    @property
    def save(self) -> str:
        """Deprecated spelling of :attr:`save_mode`."""
        warnings.warn("LoRACallback.save is deprecated; use save_mode.", DeprecationWarning,
                      stacklevel=2)
        return self.save_mode

    # -- injection ---------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        harden_checkpoint_io(trainer)
        if "configure_model" not in pl_module.__dict__:
            pl_module.configure_model = functools.partial(
                configure_model_then_inject, self.inject, pl_module, stage
            )

    def inject(self, pl_module: LightningModule, where: str = "setup") -> InjectionReport:
        """Inject into ``pl_module`` now (idempotent) and install the checkpoint hooks."""
        try:
            report = inject_lora(pl_module, self.config, self.adapter or DEFAULT_ADAPTER)
        except TargetMatchError as err:
            raise TargetMatchError(err.field, err.value, err.entry, err.candidates, (
                f"{err.allowed}. LoRACallback: the LightningModule {type(pl_module).__name__} "
                f"was inspected {where}, after its __init__, setup() and configure_model(); "
                "build the model in one of those, or fix the config")
            ) from err
        if self.report is None or report.injected:
            self.report = report  # counted here, before any strategy shards parameters
        _enable_input_grads_for_checkpointing(pl_module)
        wrap_hook(pl_module, "on_save_checkpoint", save_hook, self.hook_state)
        wrap_hook(pl_module, "on_load_checkpoint", load_hook, self.hook_state)
        return report

    # -- reporting ---------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report_reconciled()
        if self.verbose and not self._printed and self.report is not None:
            rank_zero_info(summary_table(pl_module, self.config, self.report))
            self._printed = True
        if self.report is None or trainer.global_rank != 0:
            return
        # Lightning logs the module's hparams right after this hook. TensorBoard shows only
        # a run's first hparams record and writes hparams.yaml once, so ours must come first
        # and already hold the module's and datamodule's hparams.
        params = module_hparams(trainer, pl_module)
        params.update(hparams_for(self.config, self.report))
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _enable_input_grads_for_checkpointing(pl_module)
        if self.check_optimizer:
            _check_optimizers(trainer, pl_module)
        _check_loraplus(trainer, pl_module, self.config)
        _check_grad_scaler(trainer, pl_module, self.config)
        if self.report is None or trainer.global_rank != 0:
            return
        metrics = metrics_for(self.report)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # -- init="gradient": A from the first step's weight gradient ------------------------
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.first_step_init is not None:
            self.first_step_init.batch_start(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.first_step_init is not None:
            self.first_step_init.before_optimizer_step(trainer, pl_module)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        if self.first_step_init is not None:
            self.first_step_init.cancel()

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.first_step_init is not None:
            self.first_step_init.cancel()
        if trainer.global_rank != 0:
            return
        if self.export_adapter_dir:
            path = save_adapter(pl_module, self.export_adapter_dir, self.config, self.adapter,
                                label_names=_head_label_names(trainer, self.config))
            rank_zero_info(f"LoRA: adapter saved to {path} (PEFT format)")
        if self.export_merged_path:
            path = Path(self.export_merged_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            state = merged_state_dict(pl_module)
            write_file(path, lambda tmp: torch.save(state, tmp),
                       "the merged weights were not exported; any previous file is unchanged")
            rank_zero_info(f"LoRA: merged weights saved to {path}")

    # -- checkpoint state --------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"config": self.config.to_dict(), "save_mode": self.save_mode,
                 "adapter": self.adapter}
        if self.first_step_init is not None:
            state["gradient_init_done"] = self.first_step_init.done
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.first_step_init is not None and state_dict.get("gradient_init_done"):
            self.first_step_init.done = True  # a resumed run keeps the A it saved
        saved = state_dict.get("config")
        if saved is not None and saved != self.config.to_dict():
            rank_zero_warn(
                f"LoRACallback: the checkpoint's callback state has config {saved}, this "
                f"callback has {self.config.to_dict()}; the weights were checked against the "
                "model, so training continues with this callback's config."
            )

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._report_reconciled()

    def _report_reconciled(self) -> None:
        state = self.hook_state
        if state.reconciled_keys:
            rank_zero_info(
                f"LoRA: the checkpoint had no adapter weights; reconciled "
                f"{state.reconciled_keys} adapter key(s), which keep their fresh initialisation."
                + (" Its optimizer and LR-scheduler states (of the base run's parameters) were "
                   "not restored; they start fresh." if state.dropped_optimizer_state else "")
            )
            state.reconciled_keys = 0
            state.dropped_optimizer_state = False


def _check_optimizers(trainer: Trainer, pl_module: LightningModule) -> None:
    in_opt = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    missing = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in in_opt]
    if missing:
        raise OptimizerCoverageError(missing, (
            f"LoRACallback: {len(missing)} trainable parameter(s) are in no optimizer and would "
            f"never train: {missing[:10]}{' ...' if len(missing) > 10 else ''}. Build the "
            "optimizer in configure_optimizers() from lora_param_groups(self, lr=...) or from "
            "the parameters that require grad, e.g. `torch.optim.AdamW([p for p in "
            "self.parameters() if p.requires_grad])`; do not create it in __init__ or from a "
            "parameter list taken before LoRA was injected."))


def _check_grad_scaler(trainer: Trainer, pl_module: LightningModule, config: LoRAConfig
                       ) -> None:
    """A GradScaler (``precision="16-mixed"``) refuses float16 gradients at the first step
    with "Attempting to unscale FP16 gradients": say which tensors and what works first."""
    if getattr(trainer.precision_plugin, "scaler", None) is None:
        return
    half = [n for n, p in pl_module.named_parameters()
            if p.requires_grad and p.dtype == torch.float16]
    if half:
        raise ConfigError("adapter_dtype", config.adapter_dtype, (
            f"precision='16-mixed' scales the loss with a GradScaler, which cannot unscale "
            f"float16 gradients, and {len(half)} trainable tensor(s) are float16: "
            f"{half[:5]}{' ...' if len(half) > 5 else ''}. Keep adapters and modules_to_save "
            "in float32 with adapter_dtype=None (the default on a float16 base) or "
            "'float32'; trained biases (bias='all' or 'lora_only') keep the base's dtype, so "
            "use bias='none' or a float32 base, or train with precision='bf16-mixed'"))


def _check_loraplus(trainer: Trainer, pl_module: LightningModule, config: LoRAConfig) -> None:
    """Warn when LoRA+ is configured but the optimizer gives B no larger learning rate."""
    ratio = config.loraplus_lr_ratio
    if ratio is None or ratio == 1.0:
        return
    lr_of = {id(p): g.get("lr") for opt in trainer.optimizers for g in opt.param_groups
             for p in g["params"]}
    b_ids = b_factor_ids(pl_module)
    b_lrs = {lr_of[i] for i in b_ids if i in lr_of}
    other = {lr_of[id(p)] for p in pl_module.parameters()
             if p.requires_grad and id(p) not in b_ids and id(p) in lr_of}
    if b_lrs and other and max(b_lrs) <= min(other):
        rank_zero_warn(
            f"LoRACallback: LoRAConfig.loraplus_lr_ratio={ratio:g}, but the optimizer gives the "
            f"lora_B tensors learning rate(s) {sorted(b_lrs)}, no larger than the others' "
            f"{sorted(other)}, so LoRA+ is not applied. Build the optimizer from "
            "lora_param_groups(self, lr=...) in configure_optimizers().")


def _enable_input_grads_for_checkpointing(pl_module: LightningModule) -> None:
    """With gradient checkpointing and a frozen embedding, reentrant checkpoints see inputs
    that do not require grad and silently drop the adapters' gradients. HF models offer
    ``enable_input_require_grads`` for exactly this; call it where checkpointing is on."""
    for m in pl_module.modules():
        if not hasattr(m, "enable_input_require_grads") or getattr(m, "_lora_input_grads", False):
            continue
        # transformers 5 renamed the flag; the old name warns and is gone in v6.
        on = getattr(m, "is_activation_checkpointing", None)
        if on is None:
            on = getattr(m, "is_gradient_checkpointing", False)
        if on:
            m.enable_input_require_grads()
            m._lora_input_grads = True


def _head_label_names(trainer: Trainer, config: LoRAConfig) -> list[str] | None:
    """The datamodule's class names (its ``label_names``, as the app's text data keeps
    them), saved with an adapter that trains a head (``modules_to_save``) so a server
    answers with them; ``None`` for any other adapter or datamodule."""
    names = getattr(getattr(trainer, "datamodule", None), "label_names", None)
    if not config.modules_to_save or not isinstance(names, list | tuple) or not names:
        return None
    return [str(name) for name in names]
