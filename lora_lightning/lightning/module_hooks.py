"""Hooks that ``LoRACallback`` installs on a LightningModule instance.

Lightning runs the module's ``on_load_checkpoint`` and its strict ``load_state_dict`` before
any callback's ``on_load_checkpoint``, and runs the module's ``on_save_checkpoint`` even
under ``save_weights_only=True``. So checkpoint work that must happen in time is done by
wrapping those two module hooks (and ``configure_model``, once, to inject after the user's
model exists).

The wrappers read and write one small :class:`HookState` that the callback owns; they
never see the callback, so the dependency runs one way. They are plain picklable objects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning.pytorch import LightningModule

from ..checkpoint.meta import META_KEY, checkpoint_meta, drop_derived_keys, strip_to_adapter
from ..checkpoint.restore import prepare_base_state, prepare_lora_state
from ..config import LoRAConfig
from ..registry import canonical_name, to_model_keys


@dataclass
class HookState:
    """What the checkpoint hooks need from the callback, and what they report back."""

    config: LoRAConfig
    save_mode: str
    adapter: str | None = None
    """The named adapter the callback trains (``None``: the model's adapters, as before)."""
    reconciled_keys: int = 0
    """Adapter keys a base checkpoint lacked (they keep their fresh initialisation)."""
    dropped_optimizer_state: bool = False
    """A base checkpoint's optimizer/scheduler states were dropped (they were not ours)."""


def configure_model_then_inject(inject: Callable[..., Any], pl_module: LightningModule,
                                stage: str) -> None:
    """One call only: restore the class hook, run the user's ``configure_model``, inject."""
    pl_module.__dict__.pop("configure_model", None)
    pl_module.configure_model()
    stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn enum
    inject(pl_module, where=f"in configure_model (stage {stage!r})")


class ModuleHook:
    """Calls the module's own hook, then ``func(state, module, checkpoint)``."""

    def __init__(self, func: Callable[..., None], state: HookState, module: LightningModule,
                 original: Callable[[dict[str, Any]], None]) -> None:
        self.func, self.state, self.module, self.original = func, state, module, original

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        self.original(checkpoint)
        self.func(self.state, self.module, checkpoint)


def wrap_hook(pl_module: LightningModule, name: str, func: Callable[..., None],
              state: HookState) -> None:
    """Wrap ``pl_module.<name>`` with ``func``; a later fit's callback rebinds its own state
    around the same user hook, so wrappers never stack."""
    current = pl_module.__dict__.get(name)
    if isinstance(current, ModuleHook) and current.func is func:
        original = current.original
    else:
        original = getattr(pl_module, name)
    setattr(pl_module, name, ModuleHook(func, state, pl_module, original))


def save_hook(state: HookState, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
    meta = checkpoint_meta(pl_module, state.config, state.save_mode, state.adapter)
    if state.save_mode == "adapter":
        meta["dropped_keys"] = strip_to_adapter(pl_module, checkpoint["state_dict"],
                                                state.adapter)
    else:  # a quantized base's quantization state, which a strict load refuses
        drop_derived_keys(pl_module, checkpoint["state_dict"])
    # Keys as in the plain model (no wrapper segments such as torch.compile's _orig_mod),
    # so the file loads into an unwrapped model; load_hook maps them back.
    checkpoint["state_dict"] = {canonical_name(k): v for k, v in checkpoint["state_dict"].items()}
    checkpoint[META_KEY] = meta


def load_hook(state: HookState, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
    if isinstance(checkpoint.get("state_dict"), dict):  # file keys -> this model's keys
        checkpoint["state_dict"] = to_model_keys(pl_module, checkpoint["state_dict"])
    if checkpoint.get(META_KEY) is None:
        load_base_checkpoint(state, pl_module, checkpoint)
    else:
        load_lora_state(pl_module, checkpoint)


def load_base_checkpoint(state: HookState, pl_module: LightningModule,
                         checkpoint: dict[str, Any]) -> None:
    """A checkpoint without LoRA (a base model): the layers' load hooks let exactly their
    own adapter keys be missing; count them for the report."""
    absent = prepare_base_state(pl_module, checkpoint.get("state_dict", {}),
                                source=_source(pl_module), strict=pl_module.strict_loading,
                                check_fit=_checks_fit(pl_module))
    state.reconciled_keys += absent
    if absent:
        # Its optimizer and scheduler states belong to the base run's parameters, not to
        # the adapters: restoring them would fail or pair moments with wrong tensors.
        state.dropped_optimizer_state = bool(
            checkpoint.get("optimizer_states") or checkpoint.get("lr_schedulers")
        )
        checkpoint["optimizer_states"] = []
        checkpoint["lr_schedulers"] = []


def load_lora_state(pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
    """A checkpoint saved with LoRA: validate it and refill the base weights it left out."""
    prepare_lora_state(pl_module, checkpoint[META_KEY], checkpoint.setdefault("state_dict", {}),
                       source=_source(pl_module), strict=pl_module.strict_loading,
                       check_fit=_checks_fit(pl_module))


def _source(pl_module: LightningModule) -> str:
    """``checkpoint '<path>'`` while the Trainer restores one, else ``checkpoint``."""
    trainer = pl_module._trainer
    path = trainer.ckpt_path if trainer is not None else None
    return f"checkpoint {str(path)!r}" if path else "checkpoint"


def _checks_fit(pl_module: LightningModule) -> bool:
    trainer = pl_module._trainer
    # sharded strategies (FSDP, DeepSpeed) load into wrapped, sharded modules
    return trainer is None or not trainer.strategy.restore_checkpoint_after_setup
