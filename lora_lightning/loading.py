"""Load a LoRA training checkpoint outside the Trainer, in one call.

``LightningModule.load_from_checkpoint`` runs no callbacks, so it cannot inject adapters
or refill the base weights an adapter-only checkpoint leaves out.
:func:`load_lora_checkpoint` does both.
"""

from __future__ import annotations

import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any, TypeVar

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.model_helpers import is_overridden

from .checkpoint import META_KEY, check_adapter_keys_present, check_meta, fill_base_keys
from .config import LoRAConfig
from .inject import inject_lora
from .merge import merge_lora

M = TypeVar("M", bound=LightningModule)


class CheckpointReadError(ValueError):
    """A checkpoint file is missing, truncated or not a checkpoint."""


# What torch.load raises on a damaged file (truncated zip: OSError EINVAL; empty: EOFError).
READ_ERRORS = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
               ValueError)


def unreadable(path: str | os.PathLike, err: BaseException) -> CheckpointReadError:
    """The error for a checkpoint file that ``torch.load`` could not read."""
    first = str(err).splitlines()[0] if str(err) else ""
    raised = f"torch.load raised {type(err).__name__}" + (f": {first}" if first else "")
    if zipfile.is_zipfile(path):  # a complete archive (callers check its CRCs first)
        return CheckpointReadError(f"checkpoint {str(path)!r} could not be loaded: {raised}")
    if first.startswith("Weights only load failed"):
        # its advice (load with weights_only=False) is for intact files, not damaged ones
        raised = f"torch.load raised {type(err).__name__}"
    return CheckpointReadError(
        f"checkpoint {str(path)!r} is unreadable (truncated or corrupted?): not a complete "
        f"zip archive as torch.save writes; {raised}"
    )


def verify_checkpoint_file(path: str | os.PathLike) -> None:
    """Check the CRC-32 of every member of a checkpoint's zip archive.

    ``torch.load`` never checks them, so a flipped bit in tensor data loads silently. This
    reads the whole file once (about as long as loading it). Files that are not zip
    archives are left to ``torch.load``.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as err:
        raise unreadable(path, err) from err
    if bad is not None:
        raise CheckpointReadError(
            f"checkpoint {str(path)!r} is corrupted: archive member {bad!r} fails its CRC-32 "
            "check (a damaged disk or an interrupted copy?); use an earlier checkpoint."
        )


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load`` a checkpoint, turning every failure into one clear error naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"checkpoint {str(path)!r} does not exist or is not a file.")
    verify_checkpoint_file(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=False)
    except READ_ERRORS as err:
        raise unreadable(path, err) from err
    if not isinstance(data, dict):
        raise CheckpointReadError(
            f"checkpoint {str(path)!r} holds a {type(data).__name__}, not a checkpoint dict."
        )
    return data


def load_lora_checkpoint(
    module_cls: type[M],
    checkpoint_path: str | os.PathLike,
    *,
    config: LoRAConfig | None = None,
    base_checkpoint: str | os.PathLike | None = None,
    map_location: Any = "cpu",
    merge: bool = False,
    strict: bool = True,
    call_setup: bool = False,
    **init_kwargs: Any,
) -> M:
    """Build ``module_cls``, inject LoRA and load a checkpoint saved with ``LoRACallback``.

    Works for both ``save="adapter"`` and ``save="full"`` checkpoints. An adapter-only
    checkpoint needs the base weights: from the module's own constructor (for example a
    pretrained model loaded in ``__init__``) or from ``base_checkpoint`` (a Lightning
    checkpoint or a plain state dict of the un-injected module). The base is checked
    against the fingerprint stored at training time.

    Args:
        module_cls: the LightningModule class.
        checkpoint_path: the LoRA checkpoint.
        config: needed only for checkpoints without LoRA metadata.
        base_checkpoint: where to take base weights from, if not from the constructor.
        merge: fold the adapters into the weights for zero-overhead inference.
        strict: passed to ``load_state_dict``.
        call_setup: call ``setup("predict")`` first, for modules that build their model
            in ``setup`` (``configure_model`` is always called when overridden).
        **init_kwargs: constructor arguments, overriding the checkpoint's hyperparameters.

    Returns:
        The module in eval mode, on ``map_location``.
    """
    ckpt = read_checkpoint(checkpoint_path, map_location)
    meta = ckpt.get(META_KEY)
    if config is None:
        if meta is None:
            raise ValueError(
                f"load_lora_checkpoint: {str(checkpoint_path)!r} has no LoRA metadata; pass "
                "config=LoRAConfig(...) with the settings it was trained with."
            )
        config = LoRAConfig.from_dict(meta["config"])
    hparams = dict(ckpt.get(LightningModule.CHECKPOINT_HYPER_PARAMS_KEY) or {})
    model = module_cls(**{**hparams, **init_kwargs})
    if call_setup:
        model.setup("predict")
    if is_overridden("configure_model", model):
        model.configure_model()
    if base_checkpoint is not None:
        base = read_checkpoint(base_checkpoint, map_location)
        model.load_state_dict(base.get("state_dict", base), strict=strict)
    try:
        inject_lora(model, config)
    except ValueError as err:
        if call_setup or not is_overridden("setup", model) or "matches no module" not in str(err):
            raise
        raise ValueError(
            f"load_lora_checkpoint: {err} {module_cls.__name__} overrides setup(); if it "
            "builds its model there, pass call_setup=True."
        ) from err
    if meta is not None:
        check_meta(model, meta, source=str(checkpoint_path))
    state = dict(ckpt["state_dict"])
    if meta is not None:
        check_adapter_keys_present(model, state, source=str(checkpoint_path))
    if meta is not None and meta.get("mode") == "adapter":
        fill_base_keys(model, state)
    model.load_state_dict(state, strict=strict)
    if merge:
        merge_lora(model)
    return model.eval()
