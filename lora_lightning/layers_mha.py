"""LoRA on ``nn.MultiheadAttention``, and keeping torch's fused fast paths from bypassing
adapters.

``nn.MultiheadAttention`` never calls its projections' ``forward``: it hands
``in_proj_weight`` (q, k, v packed) and ``out_proj.weight`` to a fused kernel. So an adapter
on ``out_proj`` as a plain Linear would be silently ignored. Here the packed input
projection carries ``lora_A`` (r × E) and ``lora_B`` (3E × r) on the attention module
itself, ``out_proj`` is adapted as a Linear with the same rank and alpha, and the forward
runs MHA's own forward with the effective weights ``W + scale·B·A`` in place of the base
ones (PEFT's file layout for MHA adapters is the same, so files translate by name).

In eval mode, ``nn.TransformerEncoderLayer`` takes a fused path that reads every weight
directly, whenever no weight it reads requires grad, which is exactly the case with frozen
bases. Injection therefore marks each encoder layer that holds an adapter with a no-op
forward pre-hook, one of the conditions under which torch takes its ordinary path. An
``nn.TransformerEncoder`` around such layers turns padded batches into nested tensors by the
same test; a pre-hook lets it do so only while grad is off (then outputs equal the base
model's, zeros at padded positions included), since attention that trains cannot take
nested input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .layer_base import LoRALayer
from .layers import type_name

_FASTPATH_ATTR = "_lora_no_fastpath"
_NESTED_ATTR = "_lora_use_nested_tensor"


@contextmanager
def _weight_as(module: nn.Module, name: str, value: Tensor) -> Iterator[None]:
    """Let ``module.<name>`` read as ``value`` for the block (the parameter is untouched)."""
    params = module._parameters
    saved = params[name]
    params[name] = value
    try:
        yield
    finally:
        params[name] = saved


def _effective(layer: LoRALayer) -> Tensor:
    """The weight a layer computes with: the weight (with any merged adapters) plus the
    update of every active adapter that is not merged."""
    w = layer.weight
    names = layer._pending()
    if not names:
        return w
    if layer.lora_groups is not None:
        raise RuntimeError("per-sample adapters are not supported for nn.MultiheadAttention "
                           "(its adapter is applied as a weight update); run one adapter at "
                           "a time.")
    return layer._combined(names).to(w.dtype)


class LoRAMultiheadAttention(LoRALayer, nn.MultiheadAttention):
    """LoRA on ``nn.MultiheadAttention`` (packed q/k/v projection, no DoRA, no dropout)."""

    _lora_base_class = nn.MultiheadAttention

    # The packed input projection is this layer's adapted weight.
    weight = property(lambda self: self.in_proj_weight)
    bias = property(lambda self: self.in_proj_bias)

    @staticmethod
    def check(module: nn.MultiheadAttention, config: Any) -> type | str:
        """This class for ``module``, or the reason it cannot carry an adapter."""
        t = type(module)
        if t.forward is not nn.MultiheadAttention.forward:
            return (f"has type {type_name(t)}, a subclass of "
                    "nn.MultiheadAttention that overrides forward(); add it to "
                    "exclude_modules.")
        if not module._qkv_same_embed_dim:
            return ("is an nn.MultiheadAttention with kdim/vdim different from embed_dim "
                    "(separate q, k, v weights); LoRA supports the packed in_proj only. Add it "
                    "to exclude_modules.")
        if config.use_dora:
            return ("is an nn.MultiheadAttention, which DoRA does not support; use "
                    "use_dora=False or exclude it.")
        if config.dropout:
            return (f"is an nn.MultiheadAttention, whose adapter is applied as a weight update, "
                    f"so LoRA dropout (dropout={config.dropout}) cannot apply to its input; "
                    "use dropout=0 or exclude it.")
        return LoRAMultiheadAttention

    def _lora_shapes(self, r):
        return (r, self.embed_dim), (3 * self.embed_dim, r)

    def _delta_native(self, a, b):
        return b.float() @ a.float()

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args: Any,
                **kwargs: Any) -> Any:
        with ExitStack() as stack:
            stack.enter_context(_weight_as(self, "in_proj_weight", _effective(self)))
            if isinstance(self.out_proj, LoRALayer):
                stack.enter_context(_weight_as(self.out_proj, "weight", _effective(self.out_proj)))
            return nn.MultiheadAttention.forward(self, query, key, value, *args, **kwargs)


def _no_fastpath_hook(module: nn.Module, args: Any) -> None:
    return None


def _nested_only_without_grad(module: nn.Module, args: Any) -> None:
    module.use_nested_tensor = module.__dict__[_NESTED_ATTR] and not torch.is_grad_enabled()


def _holds_adapter(module: nn.Module) -> bool:
    return any(isinstance(c, LoRALayer) for c in module.modules())


def block_fast_paths(model: nn.Module) -> int:
    """Guard each ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` that holds
    an adapter (see the module docstring). Idempotent; returns how many are guarded."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer | nn.TransformerEncoder) and _holds_adapter(m):
            if _FASTPATH_ATTR not in m.__dict__:
                hook = _no_fastpath_hook
                if isinstance(m, nn.TransformerEncoder):
                    m.__dict__[_NESTED_ATTR] = getattr(m, "use_nested_tensor", False)
                    hook = _nested_only_without_grad
                m.__dict__[_FASTPATH_ATTR] = m.register_forward_pre_hook(hook)
            count += 1
    return count


def unblock_fast_paths(model: nn.Module) -> None:
    """Undo :func:`block_fast_paths` (after the adapters are removed)."""
    for m in model.modules():
        handle = m.__dict__.pop(_FASTPATH_ATTR, None)
        if handle is not None:
            handle.remove()
        if _NESTED_ATTR in m.__dict__:
            m.use_nested_tensor = m.__dict__.pop(_NESTED_ATTR)
