"""Adapter state dicts: the trained tensors of a LoRA model, extracted and loaded strictly."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import AdapterLoadError, AdapterTensorError, ArgumentTypeError, NoAdaptersError
from ..inject import is_bias
from ..registry import (
    find_config,
    find_registry,
    known,
    lora_layers,
    lora_param_keys,
    param_keys,
    state_keys,
)
from .tensor_rules import tensor_problem
from .transaction import model_transaction


def adapter_keys(model: nn.Module, adapter: str | None = None) -> list[str]:
    """State-dict keys of the trained tensors.

    With ``adapter=None``: every adapter tensor plus whatever else ``inject_lora`` left
    trainable (biases, ``modules_to_save``). With a name: that adapter's tensors, its own
    ``modules_to_save`` copies (when in place) and the biases its config trains.
    """
    names = param_keys(model)  # parameter name -> state-dict key (wrappers differ)
    if adapter is None:
        keys = lora_param_keys(model)
        keys.update(names.get(n, n) for n, p in model.named_parameters() if p.requires_grad)
        return sorted(keys)
    known(model, adapter)
    keys = lora_param_keys(model, adapter) | set(_head_tensors(model, adapter))
    config = find_config(model, adapter)
    if config.bias == "all":
        keys.update(names.get(n, n) for n, _ in model.named_parameters() if is_bias(n))
    elif config.bias == "lora_only":
        by_id = state_keys(model)
        keys.update(by_id.get(id(m._parameters[m.bias_name]), f"{name}.{m.bias_name}")
                    for name, m in lora_layers(model).items()
                    if adapter in m.lora_specs and m._parameters.get(m.bias_name) is not None)
    return sorted(keys)


def _head_tensors(model: nn.Module, adapter: str | None) -> dict[str, Tensor]:
    """``adapter``'s own ``modules_to_save`` tensors, keyed as when they are in place
    (they are read from the adapter's copy even while another adapter's is installed)."""
    reg = find_registry(model) if adapter is not None else None
    if reg is None:
        return {}
    return {f"{head}.{n}": t for head, module in reg.heads.get(adapter, {}).items()
            for n, t in module.state_dict(keep_vars=True).items()}


def _tensors(model: nn.Module, adapter: str | None) -> dict[str, Tensor]:
    return {**model.state_dict(keep_vars=True), **_head_tensors(model, adapter)}


def adapter_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, Tensor]:
    """Only the trained tensors of ``model`` (of one adapter, if named), keyed as in
    ``model.state_dict()``."""
    if not lora_layers(model):
        raise NoAdaptersError("adapter_state_dict")
    keys = set(adapter_keys(model, adapter))
    return {k: v.detach() for k, v in _tensors(model, adapter).items() if k in keys}


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor],
                            adapter: str | None = None, *, allow_nonfinite: bool = False,
                            source: str | None = None) -> None:
    """Load an adapter state dict strictly: every key, no extras, matching shapes.

    Every tensor must be a dense float tensor (float32, float16, bfloat16 or the model's
    own dtype for it) holding finite values; ``allow_nonfinite=True`` lets NaN and infinite
    values through, for debugging. Everything is checked before any tensor is written, and
    the load runs as one transaction, so a failed load leaves the model exactly as it was.
    Merged layers are unmerged, updated and merged again. ``source`` names the file the
    tensors come from, in errors.
    """
    if not isinstance(state_dict, Mapping):
        raise ArgumentTypeError("load_adapter_state_dict", "state_dict", state_dict,
                                "a mapping of tensors")
    expected = set(adapter_keys(model, adapter))
    if not expected:
        raise AdapterLoadError(
            "load_adapter_state_dict: the model has no LoRA layers or trainable tensors; "
            "call inject_lora(model, config) first."
        )
    targets = _tensors(model, adapter)
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    problems = []
    if missing:
        problems.append(f"missing adapter keys {preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {preview(unexpected)}")
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
            f"load_adapter_state_dict{f' ({source})' if source else ''}: the adapter does not "
            "fit this model: "
            + "; ".join(problems)
            + ". Inject with the same LoRAConfig (rank, targets, bias, modules_to_save) "
            "that produced the adapter."
        )
    check_adapter_tensors(state_dict, targets, expected, source or "state_dict",
                          allow_nonfinite)
    merged = {m: list(m.merged_adapters) for m in lora_layers(model).values() if m.merged}
    with model_transaction(model) as tx:
        tx.keep([targets[key] for key in expected] + [m.base_weight() for m in merged])
        for m in merged:
            m.unmerge()
        with torch.no_grad():
            for key in expected:
                targets[key].copy_(state_dict[key])
        for m, names in merged.items():
            m.merge(names)


def check_adapter_tensors(state_dict: Mapping[str, object], targets: Mapping[str, Tensor],
                          keys: set[str], source: str, allow_nonfinite: bool = False) -> None:
    """Refuse the first of ``keys`` in ``state_dict`` that is not a loadable adapter tensor
    (see :mod:`~lora_lightning.checkpoint.tensor_rules`), naming ``source`` and the key."""
    for key in sorted(keys & set(state_dict)):
        if not isinstance(state_dict[key], Tensor):
            continue  # reported with the keys and shapes
        problem = tensor_problem(state_dict[key], targets.get(key), adapter=True,
                                 allow_nonfinite=allow_nonfinite)
        if problem:
            raise AdapterTensorError(source, key, problem)


def preview(keys: list[str], limit: int = 10) -> str:
    shown = keys[:limit]
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{shown}{more}"
