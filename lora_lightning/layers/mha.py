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

from .base import LoRALayer
from .types import register_layer_type

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
    w = layer.base_weight()
    names = layer._pending()
    if not names:
        return w
    return layer.out_first(layer.combined_weight(names)).to(w.dtype)


class LoRAMultiheadAttention(LoRALayer, nn.MultiheadAttention):
    """LoRA on ``nn.MultiheadAttention`` (packed q/k/v projection, no DoRA, no dropout)."""

    _lora_base_class = nn.MultiheadAttention
    weight_name = "in_proj_weight"
    bias_name = "in_proj_bias"
    all_linear = True
    supports_per_sample = False
    supports_dropout = False
    supported_variants = ()

    # The packed input projection is this layer's adapted weight.
    weight = property(lambda self: self.in_proj_weight)
    bias = property(lambda self: self.in_proj_bias)

    @classmethod
    def check_module(cls, module, config):
        if not isinstance(module, LoRALayer) and not module._qkv_same_embed_dim:
            return ("is an nn.MultiheadAttention with kdim/vdim different from embed_dim "
                    "(separate q, k, v weights); LoRA supports the packed in_proj only. Add it "
                    "to exclude_modules.")
        return super().check_module(module, config)

    @classmethod
    def companions(cls, module):
        # MHA reads out_proj's weight directly and never calls it: adapt it with the same
        # rank and alpha, as part of the attention module.
        return {"out_proj": module.out_proj}

    def lora_shapes(self, r):
        return (r, self.embed_dim), (3 * self.embed_dim, r)

    def delta_weight(self, a, b):
        return b.float() @ a.float()

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args: Any,
                **kwargs: Any) -> Any:
        if self.lora_groups is not None and self._pending():
            from ..errors import PerSampleError

            raise PerSampleError("MultiheadAttention")
        with ExitStack() as stack:
            stack.enter_context(_weight_as(self, "in_proj_weight", _effective(self)))
            if isinstance(self.out_proj, LoRALayer):
                stack.enter_context(_weight_as(self.out_proj, "weight", _effective(self.out_proj)))
            return nn.MultiheadAttention.forward(self, query, key, value, *args, **kwargs)


register_layer_type(nn.MultiheadAttention, LoRAMultiheadAttention)


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
