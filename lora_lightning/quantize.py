"""QLoRA's frozen base: store the weight of every adapted ``nn.Linear`` in 4 or 8 bits
(bitsandbytes) at injection, from ``LoRAConfig.quantize_base``.

Which layers: exactly those the plan adapts. Other frozen linears stay as they are: output
heads and ``modules_to_save`` must stay dense (they train, or are tied to an embedding),
and with ``target_modules="all-linear"`` (the QLoRA recipe) every other linear is adapted
and so quantized anyway; a narrower target set is a choice to keep the rest dense.
Embeddings always stay dense.

Each ``nn.Linear`` is replaced by a bitsandbytes ``Linear4bit`` (``"nf4"`` or ``"fp4"``,
double quantization, blocks of 64) or ``Linear8bitLt`` (``"int8"``) computing in the
layer's own dtype (float32 adapters by the adapter-dtype rule); its bias is kept as the
same parameter. The module object is replaced, so hooks registered on the old one do not
follow it (register them after injection). Quantizing is deterministic, so the same pretrained base quantized again
gives the same bytes. Before a weight is replaced, a summary of its dense values is kept
on the module: the base fingerprint of checkpoints reads it, so a QLoRA checkpoint names
the dense pretrained base it was trained on (and loads onto it, quantized again).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from .config import LoRAConfig
from .errors import MissingDependencyError, UnsupportedModuleError
from .layers import LoRALayer, is_quantized_linear, quantize_weight, registered_type
from .layers.base import type_name

INSTALL = "pip install 'lora-lightning[qlora]'"
DENSE_SUMMARY = "_lora_dense_summary"
"""The attribute on a quantized module holding its dense weight's summary (see
:func:`tensor_summary`)."""
QUANTIZABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensor_summary(value: Tensor, rounded_to: torch.dtype | None = None) -> str:
    """Shape plus the sum and absolute sum of at most 4,096 evenly spaced values: what the
    base fingerprint reads of each tensor (milliseconds even for a large model). With
    ``rounded_to``, a floating-point tensor's values as that dtype would hold them."""
    flat = value.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step][:4096]
    if rounded_to is not None and sample.is_floating_point():
        sample = sample.to(rounded_to)
    sample = sample.to(torch.float64).cpu()
    return f"{tuple(value.shape)}:{sample.sum().item():.6e}:{sample.abs().sum().item():.6e}"


def require_bitsandbytes(feature: str) -> Any:
    """bitsandbytes, imported; :class:`MissingDependencyError` naming the install command
    when it is not installed."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise MissingDependencyError(feature, "bitsandbytes", INSTALL) from err
    return bitsandbytes


def _problem(module: nn.Module) -> str | None:
    """Why ``module``'s base cannot be quantized (worded to follow its name), or None."""
    if isinstance(module, LoRALayer):
        return ("already carries adapters on a dense base; quantizing it now would change "
                "the base they were trained on. Set quantize_base on the first adapter "
                "injected, or leave it None for this one")
    if type(module) is not nn.Linear:
        return (f"has type {type_name(type(module))}; quantize_base replaces plain nn.Linear "
                "layers only. Narrow target_modules to Linear layers, add it to "
                "exclude_modules, or set quantize_base=None")
    w = module.weight
    if w.dtype not in QUANTIZABLE_DTYPES:
        return (f"has a {str(w.dtype).removeprefix('torch.')} weight; quantize_base needs "
                "float32, bfloat16 or float16")
    if w.device.type not in ("cpu", "cuda"):
        return (f"is on device {w.device.type!r}; bitsandbytes quantizes on 'cpu' or 'cuda' "
                "(materialize the model first)")
    return None


def quantize_planned(model: nn.Module, plan: Any, config: LoRAConfig) -> Any:
    """Quantize the base of every module ``plan`` adapts anew (see the module docstring) and
    return the plan with their LoRA types. Everything is checked (bitsandbytes installed,
    each module a plain float ``nn.Linear`` or already quantized, the config supported on a
    quantized base) before the first module is replaced."""
    kind = config.quantize_base
    bnb = require_bitsandbytes(f"LoRAConfig(quantize_base={kind!r})")
    target = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    lora_cls = registered_type(target)
    todo = []
    for name in plan.new:
        module = model.get_submodule(name)
        if is_quantized_linear(module):
            continue  # quantized already (by transformers, or an earlier call)
        reason = _problem(module) or lora_cls.check_config(config)
        if reason:
            raise UnsupportedModuleError(name, type_name(type(module)), reason)
        todo.append(name)
    new = dict(plan.new)
    for name in todo:
        quantized = quantize_linear(model.get_submodule(name), kind)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized)
        new[name] = dataclasses.replace(new[name], lora_class=lora_cls)
    return dataclasses.replace(plan, new=new)


def quantize_linear(module: nn.Linear, kind: str) -> nn.Module:
    """A bitsandbytes linear holding ``module``'s weight in ``kind`` (``"nf4"``, ``"fp4"``,
    ``"int8"``) and its bias (the same parameter)."""
    bnb = require_bitsandbytes(f"quantize_base={kind!r}")
    w = module.weight.detach()
    has_bias = module.bias is not None
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=has_bias,
                                has_fp16_weights=False, threshold=0.0, device="meta")
    else:
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=has_bias,
                              compute_dtype=w.dtype, compress_statistics=True,
                              quant_type=kind, device="meta")
    q.__dict__[DENSE_SUMMARY] = tensor_summary(w)
    quantize_weight(q, w, kind)
    q.bias = module.bias
    q.train(module.training)
    return q


def dense_summaries(model: nn.Module) -> dict[int, str]:
    """id of each quantized weight -> its dense summary, for the base fingerprint."""
    return {id(m.weight): m.__dict__[DENSE_SUMMARY] for m in model.modules()
            if DENSE_SUMMARY in m.__dict__}

