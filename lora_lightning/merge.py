"""Merge, unmerge, unload and temporarily disable adapters.

Merging folds ``scale·B·A`` into ``W`` so inference costs nothing extra; it is always an
explicit call, never a side effect of ``train()``/``eval()``.

Tied weights (an embedding shared with an output layer, GPT-2's ``lm_head``): merging
into a tensor that another module also uses would change that module too, so it is
refused with a :class:`~lora_lightning.errors.TiedWeightError`, unless ``untie=True``
gives the adapted module its own copy first (the other module keeps the base weight).

Quantized bases (QLoRA): writing W + ΔW back into 4 or 8 bits rounds it to the
quantization grid, so :func:`merge_lora` refuses it
(:class:`~lora_lightning.errors.QuantizedMergeError`, saying what is lost) unless asked to
``requantize`` (lossy) or to ``dequantize`` (the layers become dense float32, then merge
exactly). :func:`merged_state_dict` and :func:`unload_lora` with ``merge=True`` always give
dense weights (float32, or the ``dtype`` asked for), loadable by the plain model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .errors import ArgumentError, QuantizedMergeError, TiedWeightError
from .heads import plain_head, saved_base_dtypes
from .layers import LoRALayer, dense_quantized_weight, is_quantized_linear, unblock_fast_paths
from .registry import (
    REGISTRY_ATTR,
    derived_keys,
    find_registry,
    lora_layers,
    lora_param_keys,
    swap_module,
)

_UNTIE = ("Call merge_lora(model, untie=True) to give the adapted module its own copy of the "
          "weight first (the tied modules keep the base weight), or keep the adapter unmerged.")
_NO_EXPORT = ("A merged state dict cannot hold two values for a tensor the plain model ties: "
              "export the adapter with save_adapter instead, or untie the weights in the model "
              "(for transformers, tie_word_embeddings=False) before training.")


def tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """Adapted module -> the other parameter names that share its weight tensor."""
    holders: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        holders[id(p)].append(name)
    out = {}
    for name, layer in lora_layers(model).items():
        own = f"{name}.{layer.weight_name}" if name else layer.weight_name
        others = [n for n in holders[id(layer.base_weight())] if n != own]
        if others:
            out[name] = others
    return out


def _check_tied(model: nn.Module, layers: list[LoRALayer], untie: bool, hint: str) -> None:
    tied = tied_weights(model)
    by_layer = {id(m): n for n, m in lora_layers(model).items()}
    for layer in layers:
        name = by_layer[id(layer)]
        if name not in tied:
            continue
        if not untie:
            raise TiedWeightError(name, tied[name], hint)
        attr = layer.weight_name
        w = getattr(layer, attr)
        setattr(layer, attr, nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad))


def merge_lora(model: nn.Module, untie: bool = False, *, requantize: bool = False,
               dequantize: bool = False) -> int:
    """Merge every adapter into its base weight. Returns how many layers were merged.

    A weight tied to another module is refused before anything changes, unless
    ``untie=True`` (see the module docstring). A quantized base is refused too
    (:class:`~lora_lightning.errors.QuantizedMergeError`) unless ``requantize=True`` (merge,
    then quantize again: lossy, and unmerging does not give the adapter back exactly) or
    ``dequantize=True`` (those layers become dense float32 ``nn.Linear`` bases first).
    """
    if requantize and dequantize:
        raise ArgumentError("merge_lora", "requantize", requantize,
                            "expected at most one of requantize=True and dequantize=True")
    named = {n: m for n, m in lora_layers(model).items() if not m.merged}
    quantized = [n for n, m in named.items() if m.merge_loss]
    if quantized and not (requantize or dequantize):
        raise QuantizedMergeError("merge_lora", quantized, named[quantized[0]].merge_loss)
    layers = list(named.values())
    _check_tied(model, layers, untie, _UNTIE)
    if dequantize:
        for name in quantized:
            named[name].dequantize_base()
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora`. Returns how many layers were unmerged."""
    layers = [m for m in lora_layers(model).values() if m.merged]
    for layer in layers:
        layer.unmerge()
    return len(layers)


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None
                      ) -> dict[str, Tensor]:
    """A plain state dict with the adapters folded in, for the un-injected model class.

    The model itself is not modified. The result loads with ``strict=True`` into a fresh
    instance of the original model and computes the same outputs. Refused for an adapted
    weight that is tied to another module (the plain model would tie them again).

    Quantized bases (adapted or not) come out dense, float32, without their quantization
    state: the state dict of the model before ``quantize_base`` (a plain ``nn.Linear``).
    ``dtype`` casts every floating-point tensor (``torch.bfloat16`` for a half-size export).
    """
    layers = lora_layers(model)
    tied = {n: t for n, t in tied_weights(model).items() if not layers[n].merged}
    if tied:
        name = next(iter(tied))
        raise TiedWeightError(name, tied[name], _NO_EXPORT)
    skip = lora_param_keys(model) | derived_keys(model)
    heads = saved_base_dtypes(model)  # float32 modules_to_save: once to the base dtype
    merged = {f"{name}.{layer.weight_name}": layer.merged_weight()
              for name, layer in layers.items()}
    merged.update({f"{name}.weight": dense_quantized_weight(m)
                   for name, m in model.named_modules()
                   if is_quantized_linear(m) and not isinstance(m, LoRALayer)})
    merged.update({key: value.to(base) for key, value in model.state_dict().items()
                   if (base := heads.get(key)) is not None})
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        value = merged.get(key, value)
        out[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return out


def unload_lora(model: nn.Module, merge: bool = True, untie: bool = False,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """Remove every adapter and restore the original module types, in place.

    With ``merge=True`` (the default) the adapters are folded into the weights first
    (tied weights as in :func:`merge_lora`); with ``merge=False`` they are discarded and
    the base weights restored. Parameters keep their ``requires_grad`` flags. Returns
    ``model``.

    A quantized base (QLoRA) becomes a dense ``nn.Linear`` of ``dtype`` (float32 by default)
    with the merged weight when ``merge=True``; with ``merge=False`` it stays quantized.
    A ``modules_to_save`` module kept in float32 on a half-precision base gets its own type
    back, cast once to the base dtype.
    """
    layers = list(lora_layers(model).values())
    if merge:
        _check_tied(model, [m for m in layers if not m.merged], untie, _UNTIE)
    for layer in layers:
        if merge and layer.merge_loss:
            layer.unmerge()  # a requantized merge: back to the base, then merged densely
            layer.dequantize_base(dtype)
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        base = layer._lora_base_class
        layer._lora_teardown()
        layer.__class__ = base
    for m in list(model.modules()):
        plain_head(m)  # a modules_to_save copy in float32: its own type, the base dtype
    unblock_fast_paths(model)
    for m in model.modules():
        m.__dict__.pop(REGISTRY_ATTR, None)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block; adapters come back on exit.

    Merged layers are unmerged for the block and merged again after it. Modules in
    ``modules_to_save`` are replaced by their copies from before any adapter trained them,
    so the block computes exactly the base model (issue 22).
    """
    layers: list[LoRALayer] = list(lora_layers(model).values())
    reg = find_registry(model)
    heads = {name: model.get_submodule(name) for name in (reg.pristine if reg else {})}
    remerge = [m for m in layers if m.merged]
    for m in remerge:
        m.unmerge()
    previous = [m.lora_disabled for m in layers]
    for m in layers:
        m.lora_disabled = True
    for name in heads:
        swap_module(model, name, reg.pristine[name])
    try:
        yield model
    finally:
        for name, module in heads.items():
            swap_module(model, name, module)
        for m, prev in zip(layers, previous, strict=True):
            m.lora_disabled = prev
        for m in remerge:
            m.merge()
