"""Safer checkpoint files for a Trainer's default ``TorchCheckpointIO``.

Lightning stages a checkpoint in the system temp dir and moves it into place; where that is
another filesystem (a local ``/tmp``, a network checkpoint dir) the move is a copy into
``last.ckpt`` itself, and a kill mid-copy truncates it. Saves here go to a hidden
``.<name>.<pid>.partial`` beside the target, are fsynced and ``os.replace``d into place;
write errors name the file. Loads check the archive's CRCs first (``torch.load`` does not)
and turn a damaged file's error into :class:`CheckpointReadError` naming it.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer

from .loading import READ_ERRORS, CheckpointReadError, unreadable, verify_checkpoint_file


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
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        original(checkpoint, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:
            raise OSError(
                err.errno,
                f"{err.strerror}; the checkpoint was not saved and any previous file there is "
                f"unchanged (Lightning first writes it to {tempfile.gettempdir()})",
                str(target),
            ) from err
        raise
    # Left by runs killed mid-save (another pid).
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        with contextlib.suppress(OSError):
            stale.unlink()
    return None


def _load_checked(original, path, *args, **kwargs) -> dict[str, Any]:
    target = _local_path(path)
    if target is None or not target.is_file():
        return original(path, *args, **kwargs)
    verify_checkpoint_file(target)
    try:
        checkpoint = original(path, *args, **kwargs)
    except READ_ERRORS as err:
        if zipfile.is_zipfile(target) and "Weights only load failed" in str(err):
            raise  # an intact file that torch.load(weights_only=True) refuses: its own advice
        raise unreadable(target, err) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointReadError(
            f"checkpoint {str(target)!r} holds a {type(checkpoint).__name__}, not a checkpoint "
            "dict."
        )
    return checkpoint
