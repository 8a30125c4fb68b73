"""What a tensor from a file must be before it is copied into a model, written once.

Every load (checkpoints, adapter files, adapter state dicts) asks :func:`tensor_problem`
before its first change. ``Tensor.copy_`` would fail half-way on a meta, sparse or
quantized tensor, drop a complex tensor's imaginary part, and round any dtype; NaN and
infinite values load silently. So:

* every tensor must be dense and strided, not on the meta device, not quantized or nested,
  not complex unless its target is, and of a floating dtype exactly when its target is;
* an adapter tensor (a trained one: A, B, magnitudes, heads, trained biases) must also be
  float32, float16 or bfloat16, or the dtype the model holds for it, and finite, unless
  the caller opts in with ``allow_nonfinite=True`` (for debugging a diverged run).
"""

from __future__ import annotations

import torch
from torch import Tensor

ADAPTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_problem(value: object, target: Tensor | None, *, adapter: bool = False,
                   allow_nonfinite: bool = False) -> str | None:
    """Why ``value`` must not be copied into ``target`` (worded to follow "tensor <key>"),
    or ``None``. Shapes are the caller's to compare."""
    if not isinstance(value, Tensor):
        return f"is a {type(value).__name__}, not a tensor"
    if value.device.type == "meta":
        return "is a meta tensor (it holds no values)"
    if value.layout != torch.strided:
        return f"has layout {str(value.layout).removeprefix('torch.')}, not a dense tensor"
    if value.is_quantized:
        return f"is quantized ({_dtype_name(value.dtype)}), not a dense tensor"
    if value.is_nested:
        return "is a nested tensor, not a dense one"
    if target is None:
        return None
    if value.is_complex() != target.is_complex() or (
            value.is_floating_point() != target.is_floating_point()):
        return (f"has dtype {_dtype_name(value.dtype)}, which cannot stand for the model's "
                f"{_dtype_name(target.dtype)} without losing values")
    if not adapter:
        return None
    if value.dtype not in ADAPTER_DTYPES and value.dtype != target.dtype:
        return (f"has dtype {_dtype_name(value.dtype)}; an adapter tensor must be float32, "
                f"float16 or bfloat16, or the model's own {_dtype_name(target.dtype)}")
    if not allow_nonfinite:
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            return (f"holds {bad} NaN or infinite value(s) (of {value.numel()}); pass "
                    "allow_nonfinite=True to load it anyway, for debugging")
    return None
