"""The command line's ``key=value`` overrides, checked before Hydra applies them.

Hydra refuses a key the config lacks with "Key 'nope' is not in struct" and the advice to
add it with ``+`` (wrong for a misspelt key), and passes any value to a component
(``trainer.max_epochs=abc`` fails deep inside fit). :func:`override_problem` composes the
config with the command line's groups (``lora=all_linear``, ``experiment=digits``) but
without its values, then checks each value override: its key exists (else the keys
there, and the likeliest one), and its value has a type that the component's
``__init__`` (its ``_target_``) declares for that argument. The answer is an
:class:`~lora_lightning.app.errors.AppError` (one paragraph) or None.

Anything this check cannot judge (a parse error, a group that does not exist, a
``--config-dir``) is left to Hydra, which reports it itself.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_lightning.app.errors import AppError

CONF = Path(__file__).resolve().parents[1] / "conf"


def override_problem(args: Sequence[str]) -> AppError | None:
    """The first bad ``key=value`` in ``args`` (a command line), explained; else None."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return None  # --help, --cfg, --config-dir ...: Hydra's own business
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides(
            [a for a in args if not a.startswith("-")])
    except HydraException:
        return None
    groups, values = [], []
    for o in overrides:
        if o.key_or_group.split(".")[0].split("/")[0] == "hydra":
            continue
        is_group = o.package is not None or (CONF / o.key_or_group).is_dir()
        if is_group and o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()), None)
            package = f"@{o.package}" if o.package is not None else ""
            if first is not None:
                groups.append(f"{o.key_or_group}{package}={first}")
        elif is_group or o.is_delete() or o.is_add() or o.is_force_add():
            if not o.is_sweep_override():
                groups.append(o.input_line)
        else:
            values.append(o)
    if not values:
        return None
    cfg = _compose(groups)
    if cfg is None:
        return None
    raw = OmegaConf.to_container(cfg, resolve=False)  # interpolations stay text
    for o in values:
        problem = _check_key(raw, o) or _check_type(raw, o)
        if problem is not None:
            return problem
    return None


def _compose(overrides: list[str]) -> DictConfig | None:
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("train", overrides=overrides)
    except Exception:  # noqa: BLE001 - whatever it is, Hydra reports it next
        return None


def _check_key(raw: dict, o: Any) -> AppError | None:
    node: Any = raw
    parts = o.key_or_group.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[:i])
        if isinstance(node, list):
            return None  # an index into a list: Hydra checks it
        if not isinstance(node, dict):
            return AppError(
                f"{o.input_line}: {here} is {node!r} in this config, so it has no key "
                f"{part!r}. Pick a config option where {here} is set, or set {here} itself."
            )
        if part not in node:
            keys = [str(k) for k in node]
            close = difflib.get_close_matches(part, keys, n=1)
            prefix = f"{here}." if here else ""
            guess = f" Did you mean {prefix}{close[0]}?" if close else ""
            return AppError(
                f"{o.input_line}: {here or 'the config'} has no key {part!r}.{guess} Keys "
                f"there: {', '.join(keys)}. Check the spelling; to add a key the config does "
                f"not have (an argument of your own component), write +{o.input_line}."
            )
        node = node[part]
    return None


def _check_type(raw: dict, o: Any) -> AppError | None:
    key = o.key_or_group
    parent_key, _, leaf = key.rpartition(".")
    parent: Any = raw
    for part in parent_key.split(".") if parent_key else []:
        parent = parent.get(part) if isinstance(parent, dict) else None
    target = parent.get("_target_") if isinstance(parent, dict) else None
    if not isinstance(target, str) or leaf.startswith("_") or "${" in target:
        return None
    annotation = _annotation(target, leaf)
    if annotation is None:
        return None
    try:
        given = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
    except Exception:  # noqa: BLE001 - a sweep kind without a list of values
        return None
    for value in given:
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: its type shows only when resolved
        if not _accepts(annotation, value):
            default = parent.get(leaf)
            example = f" (the config has {key}={default})" if default is not None else ""
            return AppError(
                f"{o.input_line}: `{leaf}` of {target} takes {_type_name(annotation)}, not "
                f"{value!r} ({type(value).__name__}). Give a value of that type{example}."
            )
    return None


def _annotation(target: str, name: str) -> Any:
    """The declared type of argument ``name`` of ``target``'s constructor, or None."""
    from hydra.utils import get_object

    try:
        built = get_object(target)
        function = built.__init__ if inspect.isclass(built) else built
        hints = typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - not importable here or not introspectable: no check
        return None
    return hints.get(name)


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` fits ``annotation``; types this does not know are accepted."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arm, value) for arm in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arm) for arm in typing.get_args(annotation))
    if origin is typing.Literal:
        return " or ".join(map(repr, typing.get_args(annotation)))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))
