"""One autograd node for a LoRA linear: ``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ``.

Autograd over the plain ops records a graph of six nodes per adapted layer and, in
backward, computes the input gradient of the base and of the adapter separately and adds
them (an input-sized temporary and one more pass over it). :class:`LinearLoRAFunction`
computes the same values with one node:

forward (three GEMMs, the output written once)::

    out = x Wᵀ + b                      the base op (W frozen: nothing saved for it but W)
    ax  = drop(x) Aᵀ                    (rows × r), saved
    out += s · ax Bᵀ                    in place, fused into one ``addmm_``

backward (the grad ``g`` of ``out``)::

    ga = s · g B                        (rows × r)
    dx = g W + mask ⊙ (ga A)            one ``addmm_`` into the base's input gradient
    dA = gaᵀ drop(x),  dB = s · (axᵀ g)ᵀ,  db = Σ g

The base's two products (``x Wᵀ + b`` forward, ``g W`` backward) come from a base op the
layer chooses (:meth:`~lora_lightning.layers.types.MatmulLoRA.fused_base`): :data:`DENSE`
for a dense weight, bitsandbytes' 4-bit op for a quantized one (``layers/quantized.py``,
which dequantizes W in backward into a temporary rather than saving a dense copy). ``W``
is saved as the layer stores it (dense, or packed 4-bit bytes).

Saved for backward: ``x`` (the input itself, no copy, shared by sibling projections such
as q, k, v), with dropout also the boolean mask (1 byte an element where the plain ops
save a float mask and the dropped input; ``drop(x)`` is rebuilt in backward), ``ax`` and
the weights. Every tensor arrives in one compute dtype (the activation's, or autocast's),
so no activation-sized cast runs; the small adapter tensors are cast, not the input.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor


def dropout_mask(x: Tensor, p: float) -> Tensor:
    """The keep-mask LoRA dropout draws for ``x`` (``True`` where kept): one Bernoulli draw
    per element with keep probability ``1 - p``, from the global generator."""
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)


class BaseOp(Protocol):
    """The frozen base's two products on its stored weight ``w`` (no autograd)."""

    def forward(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """``x Wᵀ + b`` for a 2-D ``x`` (rows, in): a fresh (rows, out) tensor."""
        ...

    def input_grad(self, g: Tensor, w: Tensor) -> Tensor:
        """``g W`` for the output gradient ``g`` (rows, out): a fresh (rows, in) tensor."""
        ...


class DenseBase:
    """:class:`BaseOp` of a dense out-first (out, in) weight."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return x.mm(w.t()) if bias is None else torch.addmm(bias, x, w.t())

    @staticmethod
    def input_grad(g: Tensor, w: Tensor) -> Tensor:
        return g.mm(w)


DENSE = DenseBase()


class LinearLoRAFunction(torch.autograd.Function):
    """``x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` on a 2-D ``x`` with one forward and one backward
    (see the module docstring). Arguments: ``x`` (rows, in), ``w`` the base's stored weight
    (for :data:`DENSE` (out, in) out-first), ``bias`` (out) or ``None``, ``a`` (r, in),
    ``b`` (out, r), all of ``x``'s dtype; ``scale``; the dropout probability ``p`` (``0``
    for none); ``base`` the :class:`BaseOp` that reads ``w``. ``w`` gets no gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                scale: float, p: float, base: BaseOp = DENSE) -> Tensor:
        out = base.forward(x, w, bias)
        mask = None
        xd = x
        if p > 0.0:
            mask = dropout_mask(x, p)
            xd = x * mask * (1.0 / (1.0 - p))
        ax = xd.mm(a.t())
        out.addmm_(ax, b.t(), alpha=scale)
        ctx.scale, ctx.p, ctx.has_bias, ctx.base = scale, p, bias is not None, base
        ctx.save_for_backward(x, mask, ax, w, a, b)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor | None) -> tuple[Tensor | None, ...]:
        x, mask, ax, w, a, b = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        if g is None:
            return None, None, None, None, None, None, None, None
        dx = dbias = da = db = None
        ga = g.mm(b).mul_(ctx.scale) if (need_x or need_a) else None
        if need_x:
            dx = ctx.base.input_grad(g, w)
            if mask is None:
                dx.addmm_(ga, a)
            else:
                dx.add_(ga.mm(a).mul_(mask), alpha=1.0 / (1.0 - ctx.p))
        if need_a:
            xd = x if mask is None else x * mask * (1.0 / (1.0 - ctx.p))
            da = ga.t().mm(xd)
        if need_b:
            db = ax.t().mm(g).mul_(ctx.scale).t()  # 2-3x faster on CPU than gᵀ·ax
        if need_bias and ctx.has_bias:
            dbias = g.sum(0)
        return dx, None, dbias, da, db, None, None, None


def linear_lora(x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                scale: float, p: float, base: BaseOp = DENSE) -> Tensor:
    """The output of :class:`LinearLoRAFunction` for a 2-D ``x``."""
    return LinearLoRAFunction.apply(x, w, bias, a, b, scale, p, base)
