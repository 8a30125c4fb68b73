"""Adapter state dicts: extract, load strictly, and fingerprint the base weights.

Key reconciliation for loading a *base* checkpoint into a LoRA model lives on the layers
themselves (load hooks installed at injection, see ``layers.py``): each layer removes only
its own adapter keys from ``missing_keys``, so a genuinely missing base weight still fails
a strict load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .inject import find_config, lora_layers, lora_param_keys


class AdapterLoadError(ValueError):
    """An adapter state dict does not fit the model it is loaded into."""


def adapter_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the trained tensors: adapters, plus trainable biases and
    ``modules_to_save`` parameters (whatever ``inject_lora`` left trainable)."""
    keys = lora_param_keys(model)
    keys.update(n for n, p in model.named_parameters() if p.requires_grad)
    return sorted(keys)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the trained tensors of ``model``, keyed as in ``model.state_dict()``."""
    if not lora_layers(model):
        raise ValueError(
            "adapter_state_dict: the model has no LoRA layers; call inject_lora(model, config) "
            "first."
        )
    keys = set(adapter_keys(model))
    return {k: v for k, v in model.state_dict(keep_vars=False).items() if k in keys}


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load an adapter state dict strictly: every key, no extras, matching shapes.

    Everything is checked before any tensor is written, so a failed load leaves the model
    exactly as it was. Merged layers are unmerged, updated and merged again.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"load_adapter_state_dict: expected a mapping of tensors, got "
            f"{type(state_dict).__name__}."
        )
    expected = set(adapter_keys(model))
    if not expected:
        raise AdapterLoadError(
            "load_adapter_state_dict: the model has no LoRA layers or trainable tensors; "
            "call inject_lora(model, config) first."
        )
    targets = model.state_dict(keep_vars=True)
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    problems = []
    if missing:
        problems.append(f"missing adapter keys {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_preview(unexpected)}")
    for key in sorted(expected & set(state_dict)):
        value = state_dict[key]
        if not isinstance(value, Tensor):
            problems.append(f"{key!r} is a {type(value).__name__}, not a tensor")
        elif value.shape != targets[key].shape:
            problems.append(
                f"shape mismatch for {key!r}: checkpoint has {tuple(value.shape)}, model has "
                f"{tuple(targets[key].shape)}"
            )
    if problems:
        raise AdapterLoadError(
            "load_adapter_state_dict: the adapter does not fit this model: "
            + "; ".join(problems)
            + ". Inject with the same LoRAConfig (rank, targets, bias, modules_to_save) "
            "that produced the adapter."
        )
    merged = [m for m in lora_layers(model).values() if m.merged]
    for m in merged:
        m.unmerge()
    with torch.no_grad():
        for key in expected:
            targets[key].copy_(state_dict[key])
    for m in merged:
        m.merge()


def _preview(keys: list[str], limit: int = 10) -> str:
    shown = keys[:limit]
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{shown}{more}"


def base_fingerprint(model: nn.Module) -> dict[str, object]:
    """Shapes plus a cheap content hash of the frozen base parameters (not buffers,
    which training may change).

    Reads at most 4,096 evenly spaced values per tensor, so it costs milliseconds even
    for large models. Take it while the adapters are not merged.
    """
    excluded = set(adapter_keys(model))
    digest = hashlib.sha256()
    n = 0
    for key, value in model.named_parameters():
        if key in excluded:
            continue
        flat = value.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(torch.float64).cpu()
        digest.update(f"{key}:{tuple(value.shape)}:".encode())
        digest.update(f"{sample.sum().item():.6e}:{sample.abs().sum().item():.6e}".encode())
        n += 1
    return {"tensors": n, "sha256": digest.hexdigest()}


# -- training checkpoints (plain dicts; the Lightning callback is a thin layer on these) --
META_KEY = "lora_lightning"
META_VERSION = 1
SAVE_MODES = ("adapter", "full")


class CheckpointMismatchError(ValueError):
    """A checkpoint was made for another rank, target set or base model."""


def _classify_keys(model: nn.Module) -> tuple[set[str], set[str]]:
    """(trained keys, frozen parameter keys) of ``model.state_dict()``; the rest are buffers."""
    trained = set(adapter_keys(model))
    frozen = {
        k for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, nn.Parameter) and k not in trained
    }
    return trained, frozen


def checkpoint_meta(model: nn.Module, config, mode: str) -> dict[str, object]:
    """Metadata stored beside a LoRA training checkpoint's state dict."""
    if mode not in SAVE_MODES:
        raise ValueError(f"checkpoint mode: got {mode!r}; expected one of {list(SAVE_MODES)}.")
    layers = lora_layers(model)
    return {
        "version": META_VERSION,
        "mode": mode,
        "config": config.to_dict(),
        "injected": sorted(layers),
        "ranks": {n: m.r for n, m in layers.items()},
        "fingerprint": base_fingerprint(model),
    }


def strip_to_adapter(model: nn.Module, state_dict: dict[str, Tensor]) -> int:
    """Drop the frozen base parameters from ``state_dict`` in place; keep trained tensors
    and every buffer (training may change any buffer, BatchNorm statistics for example).
    Returns how many keys were dropped."""
    _, frozen = _classify_keys(model)
    dropped = [k for k in state_dict if k in frozen]
    for k in dropped:
        del state_dict[k]
    return len(dropped)


def fill_base_keys(model: nn.Module, state_dict: dict[str, Tensor]) -> int:
    """Add the model's own frozen base parameters to an adapter-only ``state_dict``.

    Only frozen *parameters* are filled; a missing trained tensor or buffer stays missing,
    so a strict load still reports it. Returns how many keys were added.
    """
    _, frozen = _classify_keys(model)
    current = model.state_dict()
    added = [k for k in frozen if k not in state_dict]
    for k in added:
        state_dict[k] = current[k]
    return len(added)


def check_adapter_keys_present(
    model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint"
) -> None:
    """Refuse a LoRA checkpoint whose state dict lacks adapter tensors.

    The layers' load hooks let adapter keys be missing so that a *base* checkpoint loads;
    a checkpoint saved with LoRA must hold them all, or the adapters would silently keep
    their fresh initialisation. Raises :class:`AdapterLoadError` naming the missing keys.
    """
    missing = sorted(k for k in lora_param_keys(model) if k not in state_dict)
    if missing:
        raise AdapterLoadError(
            f"{source}: the LoRA checkpoint lacks adapter keys {_preview(missing)}; a "
            "checkpoint saved with LoRA must hold every adapter tensor (was it edited or "
            "saved by another tool?)."
        )


class StateDictMismatchError(AdapterLoadError, RuntimeError):
    """A checkpoint's state dict does not fit the model; refused before anything is copied.

    Also a ``RuntimeError``, the type torch's strict ``load_state_dict`` raises for the same
    problems (after copying every tensor that did fit).
    """


def check_state_dict_fits(
    model: nn.Module, state_dict: Mapping[str, object], strict: bool = True,
    may_miss: frozenset[str] | set[str] = frozenset(), source: str = "checkpoint",
) -> None:
    """Check what a strict ``model.load_state_dict(state_dict)`` checks, without copying.

    ``load_state_dict`` copies every tensor that fits and only then raises, leaving the model
    half-loaded. Calling this first makes a refused load leave the model as it was. Keys in
    ``may_miss`` may be absent; with ``strict=False`` only shapes and types are checked.
    """
    targets = model.state_dict(keep_vars=True)
    problems = []
    if strict:
        missing = sorted(set(targets) - set(state_dict) - set(may_miss))
        unexpected = sorted(set(state_dict) - set(targets))
        if missing:
            problems.append(f"missing keys {_preview(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_preview(unexpected)}")
    for key in sorted(set(targets) & set(state_dict)):
        value, target = state_dict[key], targets[key]
        if isinstance(target, nn.parameter.UninitializedParameter):
            continue
        if not isinstance(value, Tensor):
            problems.append(f"{key!r} is a {type(value).__name__}, not a tensor")
        elif value.shape != target.shape:
            problems.append(f"size mismatch for {key!r}: checkpoint has {tuple(value.shape)}, "
                            f"model has {tuple(target.shape)}")
    if problems:
        raise StateDictMismatchError(
            f"{source} does not fit {type(model).__name__}: " + "; ".join(problems)
            + ". Nothing was loaded; the model is unchanged."
        )


def check_meta(model: nn.Module, meta: Mapping, source: str = "checkpoint") -> None:
    """Refuse a checkpoint made for another rank, target set or base model.

    Raises :class:`CheckpointMismatchError` naming every difference found.
    """
    if not isinstance(meta, Mapping) or meta.get("version") != META_VERSION:
        got = meta.get("version") if isinstance(meta, Mapping) else type(meta).__name__
        raise CheckpointMismatchError(
            f"{source}: LoRA metadata version {got!r} is not supported; expected {META_VERSION}."
        )
    layers = lora_layers(model)
    problems = []
    saved = set(meta.get("injected", []))
    here = set(layers)
    if saved != here:
        problems.append(
            "different target modules: only in the checkpoint "
            f"{_preview(sorted(saved - here), 5)}, only in the model "
            f"{_preview(sorted(here - saved), 5)}"
        )
    ranks = meta.get("ranks", {})
    diff = [f"{n}: checkpoint r={ranks[n]}, model r={layers[n].r}"
            for n in sorted(saved & here) if ranks.get(n) != layers[n].r]
    if diff:
        problems.append(f"different rank for {len(diff)} module(s) ({'; '.join(diff[:5])})")
    saved_cfg = meta.get("config", {})
    cfg = find_config(model)
    for key in ("alpha", "use_dora", "use_rslora", "bias", "modules_to_save"):
        if cfg is not None and key in saved_cfg and saved_cfg[key] != getattr(cfg, key):
            problems.append(f"different {key}: checkpoint {saved_cfg[key]!r}, model "
                            f"{getattr(cfg, key)!r}")
    if meta.get("mode") == "adapter" and not problems:
        # Only when the rest agrees: another target set or bias mode changes which tensors
        # count as base weights, and so the fingerprint, even on the same base model.
        fp_saved, fp_here = meta.get("fingerprint", {}), base_fingerprint(model)
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
        )
