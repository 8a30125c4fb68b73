"""Safer checkpoint files for a Trainer's default ``TorchCheckpointIO``.

Lightning stages a checkpoint in the system temp dir and moves it into place; where that is
another filesystem (a local ``/tmp``, a network checkpoint dir) the move is a copy into
``last.ckpt`` itself, and a kill mid-copy truncates it. Saves here go through
:mod:`lora_lightning.io.atomic` (a hidden temporary beside the target, fsynced, renamed into
place; write errors name the file). Loads go through
:func:`~lora_lightning.io.safe_load.read_checkpoint`: CRCs checked, nothing but tensors and
plain data unpickled unless the caller passes ``weights_only=False``, and a damaged file's
error is one :class:`CheckpointReadError` naming it.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer

from ..io.atomic import write_file
from ..io.safe_load import read_checkpoint


def harden_checkpoint_io(trainer: Trainer) -> None:
    """Wrap this trainer's default checkpoint IO once (see the module docstring)."""
    io = trainer.strategy.checkpoint_io
    if type(io) is not TorchCheckpointIO or "save_checkpoint" in io.__dict__:
        return
    io.save_checkpoint = functools.partial(_save_atomically, io.save_checkpoint)
    io.load_checkpoint = functools.partial(_load_checked, io.load_checkpoint)


def _local_path(path) -> Path | None:
    text = str(path)
    if "://" in text:
        return Path(text[len("file://"):]) if text.startswith("file://") else None
    return Path(text)


def _save_atomically(original, checkpoint: dict[str, Any], path, storage_options=None) -> None:
    target = _local_path(path)
    if target is None or storage_options is not None:
        return original(checkpoint, path, storage_options=storage_options)
    write_file(target, lambda tmp: original(checkpoint, tmp),
               "the checkpoint was not saved and any previous file there is unchanged "
               f"(Lightning first writes it to {tempfile.gettempdir()})")
    return None


def _load_checked(original, path, map_location="cpu", weights_only=None) -> dict[str, Any]:
    """Read through :func:`read_checkpoint`: CRCs checked, ``weights_only=True`` with our
    allow-list; ``trainer.fit(..., weights_only=False)`` is the explicit opt-in."""
    target = _local_path(path)
    if target is None or not target.is_file():
        return original(path, map_location=map_location, weights_only=weights_only)
    return read_checkpoint(target, map_location, trusted=weights_only is False)
