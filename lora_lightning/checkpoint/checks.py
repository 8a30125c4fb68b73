"""Checks that a checkpoint fits a LoRA model, each run before anything is copied, so a
refused load leaves the model exactly as it was."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..adapters import list_adapters
from ..errors import (
    AdapterLoadError,
    BaseWeightsInAdapterCheckpointError,
    CheckpointFieldError,
    CheckpointMismatchError,
    StateDictMismatchError,
)
from ..registry import derived_keys, find_config, lora_param_keys
from .adapter_state import preview
from .fingerprint import base_fingerprint
from .meta import META_KEY, META_VERSION, SAVE_MODES, adapter_layers, frozen_keys
from .tensor_rules import tensor_problem


def check_adapter_keys_present(
    model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint",
    adapter: str | None = None,
) -> None:
    """Refuse a LoRA checkpoint whose state dict lacks adapter tensors.

    The layers' load hooks let adapter keys be missing so that a *base* checkpoint loads;
    a checkpoint saved with LoRA must hold them all, or the adapters would silently keep
    their fresh initialisation. Raises :class:`AdapterLoadError` naming the missing keys.
    """
    missing = sorted(k for k in lora_param_keys(model, adapter) if k not in state_dict)
    if missing:
        raise AdapterLoadError(
            f"{source}: the LoRA checkpoint lacks adapter keys {preview(missing)}; a "
            "checkpoint saved with LoRA must hold every adapter tensor (was it edited or "
            "saved by another tool?)."
        )


def check_state_dict_fits(
    model: nn.Module, state_dict: Mapping[str, object], strict: bool = True,
    may_miss: frozenset[str] | set[str] = frozenset(), source: str = "checkpoint",
) -> None:
    """Check what a strict ``model.load_state_dict(state_dict)`` checks, without copying.

    ``load_state_dict`` copies every tensor that fits and only then raises, leaving the model
    half-loaded; it also fails half-way on a meta, sparse or quantized tensor and drops a
    complex one's imaginary part, so every tensor must pass
    :func:`~lora_lightning.checkpoint.tensor_rules.tensor_problem` too. Calling this first
    makes a refused load leave the model as it was. Keys in
    ``may_miss`` may be absent, and so may a quantized base's quantization state
    (:func:`~lora_lightning.registry.derived_keys`, which torch's load refuses); with ``strict=False`` only shapes and types are checked.
    """
    targets = model.state_dict(keep_vars=True)
    for key in derived_keys(model):  # a quantized base's state: never loaded, never missing
        del targets[key]
    problems = []
    if strict:
        missing = sorted(set(targets) - set(state_dict) - set(may_miss))
        unexpected = sorted(set(state_dict) - set(targets))
        if missing:
            problems.append(f"missing keys {preview(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {preview(unexpected)}")
    for key in sorted(set(targets) & set(state_dict)):
        value, target = state_dict[key], targets[key]
        if isinstance(target, nn.parameter.UninitializedParameter):
            continue
        problem = tensor_problem(value, target)
        if problem:
            problems.append(f"{key!r} {problem}")
        elif value.shape != target.shape:
            problems.append(f"size mismatch for {key!r}: checkpoint has {tuple(value.shape)}, "
                            f"model has {tuple(target.shape)}")
    if problems:
        raise StateDictMismatchError(
            f"{source} does not fit {type(model).__name__}: " + "; ".join(problems)
            + ". Nothing was loaded; the model is unchanged."
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _meta_field_problem(key: str, value: object) -> str | None:
    """What is wrong with one metadata field's type, or None."""
    if key == "mode" and value not in SAVE_MODES:
        return f"expected one of {list(SAVE_MODES)}"
    if key == "adapter" and value is not None and not isinstance(value, str):
        return "expected an adapter name (a string) or null"
    if key == "config" and not isinstance(value, Mapping):
        return "expected a mapping of LoRAConfig fields"
    if key == "injected" and not (isinstance(value, list | tuple)
                                  and all(isinstance(n, str) for n in value)):
        return "expected a list of module names"
    if key == "ranks" and not (isinstance(value, Mapping) and all(
            isinstance(n, str) and _is_int(r) for n, r in value.items())):
        return "expected a mapping from module name to an integer rank"
    if key == "fingerprint" and not (
            isinstance(value, Mapping) and isinstance(value.get("sha256"), str)
            and _is_int(value.get("tensors"))):
        return "expected a mapping with a string 'sha256' and an integer 'tensors'"
    return None


def validate_meta(meta: object, source: str = "checkpoint") -> None:
    """Refuse LoRA metadata of an unsupported version (:class:`CheckpointMismatchError`) or
    with a field of the wrong type (:class:`CheckpointFieldError`, naming the field), before
    any of it is used."""
    if not isinstance(meta, Mapping) or meta.get("version") != META_VERSION:
        got = meta.get("version") if isinstance(meta, Mapping) else type(meta).__name__
        raise CheckpointMismatchError(
            f"{source}: LoRA metadata version {got!r} is not supported; expected {META_VERSION}."
        )
    for key in ("mode", "adapter", "config", "injected", "ranks", "fingerprint"):
        if key not in meta:
            if key == "adapter":
                continue  # files from before named adapters have none
            raise CheckpointFieldError(source, f"{META_KEY}.{key}", None,
                                       "missing; the file was edited or damaged")
        problem = _meta_field_problem(key, meta[key])
        if problem:
            raise CheckpointFieldError(source, f"{META_KEY}.{key}", meta.get(key), problem)


BASE_ELSEWHERE = (
    " If the base weights did not come from the module's constructor (a random init saved "
    "before training, or weights loaded after construction), pass them: "
    "load_lora_checkpoint(..., base_checkpoint=<that state dict or checkpoint>), or load "
    "them into the model before a Trainer resume."
)
"""The fix a "different base model" mismatch names: the base from elsewhere."""


def check_meta(model: nn.Module, meta: Mapping, source: str = "checkpoint") -> None:
    """Refuse a checkpoint made for another rank, target set or base model.

    Raises :class:`CheckpointMismatchError` naming every difference found (and
    :class:`CheckpointFieldError` for malformed metadata, see :func:`validate_meta`).
    """
    validate_meta(meta, source)
    adapter = meta.get("adapter")
    if adapter is not None and adapter not in list_adapters(model):
        raise CheckpointMismatchError(
            f"{source}: the checkpoint holds adapter {adapter!r}, which this model does not "
            f"have (it has {list_adapters(model)}); inject it with that name first.")
    layers = adapter_layers(model, adapter)
    problems = []
    saved = set(meta.get("injected", []))
    here = set(layers)
    if saved != here:
        problems.append(
            "different target modules: only in the checkpoint "
            f"{preview(sorted(saved - here), 5)}, only in the model "
            f"{preview(sorted(here - saved), 5)}"
        )
    ranks = meta.get("ranks", {})
    diff = [f"{n}: checkpoint r={ranks.get(n)}, model r={layers[n]}"
            for n in sorted(saved & here) if ranks.get(n) != layers[n]]
    if diff:
        problems.append(f"different rank for {len(diff)} module(s) ({'; '.join(diff[:5])})")
    saved_cfg = meta.get("config", {})
    cfg = find_config(model, adapter)
    for key in ("alpha", "use_dora", "use_rslora", "bias", "modules_to_save"):
        if cfg is not None and key in saved_cfg and saved_cfg[key] != getattr(cfg, key):
            problems.append(f"different {key}: checkpoint {saved_cfg[key]!r}, model "
                            f"{getattr(cfg, key)!r}")
    if meta.get("mode") == "adapter" and not problems:
        # Only when the rest agrees: another target set or bias mode changes which tensors
        # count as base weights, and so the fingerprint, even on the same base model.
        fp_saved, fp_here = meta.get("fingerprint", {}), base_fingerprint(model, adapter)
        if fp_saved != fp_here and any(  # the same base, trained in bfloat16 or float16
                fp_saved == base_fingerprint(model, adapter, half)
                for half in (torch.bfloat16, torch.float16)):
            fp_here = fp_saved
        if fp_saved != fp_here:
            problems.append(
                "different base model: the checkpoint holds adapters only, trained on base "
                f"weights with fingerprint {fp_saved.get('sha256', '?')[:12]} "
                f"({fp_saved.get('tensors', '?')} tensors), but this model's base weights have "
                f"{fp_here['sha256'][:12]} ({fp_here['tensors']} tensors)"
            )
    if problems:
        raise CheckpointMismatchError(
            f"{source} does not fit this LoRA model: " + "; ".join(problems)
            + ". Use the LoRAConfig and base model the checkpoint was trained with."
            + (BASE_ELSEWHERE if any(p.startswith("different base model") for p in problems)
               else "")
        )


def check_no_base_weights(model: nn.Module, state_dict: Mapping[str, object],
                          adapter: str | None = None, source: str = "checkpoint") -> None:
    """Refuse an adapter-only checkpoint that carries the model's frozen base weights
    (:class:`BaseWeightsInAdapterCheckpointError`): ``save_mode="adapter"`` strips them all,
    so one found there was put in by hand, and would overwrite the base silently."""
    carried = sorted(frozen_keys(model, adapter) & set(state_dict))
    if carried:
        raise BaseWeightsInAdapterCheckpointError(source, carried)
