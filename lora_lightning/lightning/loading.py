"""Load a LoRA training checkpoint outside the Trainer, in one call.

``LightningModule.load_from_checkpoint`` runs no callbacks, so it cannot inject adapters
or refill the base weights an adapter-only checkpoint leaves out.
:func:`load_lora_checkpoint` does both.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.model_helpers import is_overridden

from ..checkpoint.meta import META_KEY
from ..checkpoint.restore import prepare_lora_state
from ..config import LoRAConfig
from ..errors import CheckpointMismatchError, CheckpointReadError, TargetMatchError
from ..inject import inject_lora
from ..io.safe_load import read_checkpoint
from ..layers.base import DEFAULT_ADAPTER
from ..merge import merge_lora

__all__ = ["CheckpointReadError", "load_lora_checkpoint", "read_checkpoint"]

M = TypeVar("M", bound=LightningModule)


def load_lora_checkpoint(
    module_cls: type[M] | M,
    checkpoint_path: str | os.PathLike,
    *,
    config: LoRAConfig | None = None,
    base_checkpoint: str | os.PathLike | None = None,
    map_location: Any = "cpu",
    merge: bool = False,
    strict: bool = True,
    call_setup: bool = False,
    trusted: bool = False,
    **init_kwargs: Any,
) -> M:
    """Build ``module_cls``, inject LoRA and load a checkpoint saved with ``LoRACallback``.

    Works for both ``save="adapter"`` and ``save="full"`` checkpoints. An adapter-only
    checkpoint needs the base weights: from the module's own constructor (for example a
    pretrained model loaded in ``__init__``) or from ``base_checkpoint`` (a Lightning
    checkpoint or a plain state dict of the un-injected module). The base is checked
    against the fingerprint stored at training time.

    Args:
        module_cls: the LightningModule class, or a module instance to load into (for
            example one that already carries another adapter: a checkpoint of a named
            adapter is added beside it, the others are left as they are).
        checkpoint_path: the LoRA checkpoint.
        config: needed only for checkpoints without LoRA metadata.
        base_checkpoint: where to take base weights from, if not from the constructor.
        merge: fold the adapters into the weights for zero-overhead inference.
        strict: passed to ``load_state_dict``.
        call_setup: call ``setup("predict")`` first, for modules that build their model
            in ``setup`` (``configure_model`` is always called when overridden).
        trusted: load both files with ``torch.load(weights_only=False)``, which runs
            whatever they pickle. Only for files you made or trust; by default a file
            that pickles more than tensors and plain data is refused (``UnsafeFileError``).
        **init_kwargs: constructor arguments, overriding the checkpoint's hyperparameters.

    Returns:
        The module in eval mode, on ``map_location``.
    """
    ckpt = read_checkpoint(checkpoint_path, map_location, trusted=trusted)
    meta = ckpt.get(META_KEY)
    if config is None:
        if meta is None:
            raise CheckpointMismatchError(
                f"load_lora_checkpoint: {str(checkpoint_path)!r} has no LoRA metadata; pass "
                "config=LoRAConfig(...) with the settings it was trained with."
            )
        config = LoRAConfig.from_dict(meta["config"])
    adapter = (meta or {}).get("adapter")
    if isinstance(module_cls, LightningModule):
        model, module_cls = module_cls, type(module_cls)
    else:
        hparams = dict(ckpt.get(LightningModule.CHECKPOINT_HYPER_PARAMS_KEY) or {})
        model = module_cls(**{**hparams, **init_kwargs})
        if call_setup:
            model.setup("predict")
        if is_overridden("configure_model", model):
            model.configure_model()
    if base_checkpoint is not None:
        base = read_checkpoint(base_checkpoint, map_location, trusted=trusted)
        model.load_state_dict(base.get("state_dict", base), strict=strict)
    try:
        inject_lora(model, config, adapter or DEFAULT_ADAPTER)
    except TargetMatchError as err:
        if call_setup or not is_overridden("setup", model):
            raise
        raise TargetMatchError(err.field, err.value, err.entry, err.candidates, (
            f"{err.allowed}. load_lora_checkpoint: {module_cls.__name__} overrides setup(); "
            "if it builds its model there, pass call_setup=True")) from err
    state = dict(ckpt["state_dict"])
    if meta is not None:
        prepare_lora_state(model, meta, state, source=str(checkpoint_path), strict=strict)
    model.load_state_dict(state, strict=strict)
    if merge:
        merge_lora(model)
    return model.eval()
