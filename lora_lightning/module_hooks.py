"""Hooks that ``LoRACallback`` installs on a LightningModule instance.

Lightning runs the module's ``on_load_checkpoint`` and its strict ``load_state_dict`` before
any callback's ``on_load_checkpoint``, and runs the module's ``on_save_checkpoint`` even
under ``save_weights_only=True``. So checkpoint work that must happen in time is done by
wrapping those two module hooks (and ``configure_model``, once, to inject after the user's
model exists). Wrappers are ``functools.partial`` objects, so the module still pickles.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule

from .checkpoint import (
    META_KEY,
    check_adapter_keys_present,
    check_meta,
    check_state_dict_fits,
    checkpoint_meta,
    fill_base_keys,
    strip_to_adapter,
)
from .inject import lora_param_keys

if TYPE_CHECKING:
    from .callback import LoRACallback


def configure_model_then_inject(
    callback: LoRACallback, pl_module: LightningModule, stage: str
) -> None:
    pl_module.__dict__.pop("configure_model", None)  # one call only: restore the class hook
    pl_module.configure_model()
    stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn enum
    callback.inject(pl_module, where=f"in configure_model (stage {stage!r})")


def wrap_hook(pl_module: LightningModule, name: str, hook, callback: LoRACallback) -> None:
    current = pl_module.__dict__.get(name)
    if isinstance(current, functools.partial) and current.func is hook:
        # Wrapped by an earlier fit: rebind to this callback (its save mode and report),
        # around the same user hook, so hooks never stack.
        original = current.args[2]
    else:
        original = getattr(pl_module, name)
    setattr(pl_module, name, functools.partial(hook, callback, pl_module, original))


def save_hook(callback, pl_module, original, checkpoint: dict[str, Any]) -> None:
    original(checkpoint)
    meta = checkpoint_meta(pl_module, callback.config, callback.save)
    if callback.save == "adapter":
        meta["dropped_keys"] = strip_to_adapter(pl_module, checkpoint["state_dict"])
    checkpoint[META_KEY] = meta


def load_hook(callback, pl_module, original, checkpoint: dict[str, Any]) -> None:
    original(checkpoint)
    meta = checkpoint.get(META_KEY)
    if meta is None:
        # A checkpoint without LoRA (a base model): the layers' load hooks let exactly
        # their own adapter keys be missing; count them for the report.
        sd = checkpoint.get("state_dict", {})
        adapter = lora_param_keys(pl_module)
        absent = sum(1 for k in adapter if k not in sd)
        _check_fits(pl_module, sd, may_miss=adapter)
        callback.reconciled_keys += absent
        if absent:
            # Its optimizer and scheduler states belong to the base run's parameters, not
            # to the adapters: restoring them would fail or pair moments with wrong tensors.
            callback.dropped_optimizer_state = bool(
                checkpoint.get("optimizer_states") or checkpoint.get("lr_schedulers")
            )
            checkpoint["optimizer_states"] = []
            checkpoint["lr_schedulers"] = []
        return
    source = _source(pl_module)
    check_meta(pl_module, meta, source=source)
    check_adapter_keys_present(pl_module, checkpoint.get("state_dict", {}), source=source)
    if meta.get("mode") == "adapter":
        fill_base_keys(pl_module, checkpoint["state_dict"])
    _check_fits(pl_module, checkpoint.get("state_dict", {}))


def _source(pl_module: LightningModule) -> str:
    """``checkpoint '<path>'`` while the Trainer restores one, else ``checkpoint``."""
    trainer = pl_module._trainer
    path = trainer.ckpt_path if trainer is not None else None
    return f"checkpoint {str(path)!r}" if path else "checkpoint"


def _check_fits(pl_module: LightningModule, state_dict, may_miss=frozenset()) -> None:
    trainer = pl_module._trainer
    if trainer is not None and trainer.strategy.restore_checkpoint_after_setup:
        return  # sharded strategies (FSDP, DeepSpeed) load into wrapped, sharded modules
    check_state_dict_fits(pl_module, state_dict, strict=pl_module.strict_loading,
                          may_miss=may_miss, source=_source(pl_module))
