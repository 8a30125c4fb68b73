"""Start each adapter's ``A`` along its layer's weight gradient (``LoRAConfig(init="gradient")``).

A new adapter has ``B = 0``, so its first update is ``ΔB = -lr · s · G Aᵀ``, where ``G`` is
the gradient of the loss with respect to the frozen weight (in the ``(out, in)`` layout)
and ``s`` the adapter's scale: a random ``A`` projects ``G`` onto ``r`` random directions
of the input space. Here ``A`` is instead set to the top ``r`` right singular vectors of
``G`` on the first batch, so ``B`` starts along the directions full fine-tuning would move
the weight most (the ``A`` half of LoRA-GA, Wang et al. 2024, without rewriting ``W``). ``B``
stays zero, so the model is unchanged; ``A``'s rows keep kaiming's norm (``1/√3``), so
the learning rate that suits the default init suits this one.

It costs one weight gradient per adapted layer, once: :meth:`GradientInit.start` makes
the layers' base weights require grad for the next backward (the memory of full
fine-tuning's gradients, on that step only), and :meth:`GradientInit.finish` reads them,
sets ``A``, gives ``B`` the gradient it would have had with the new ``A`` (exactly
``s · G Aᵀ``; ``A``'s own gradient is zero while ``B`` is), and makes the weights frozen
again. The optimizer step then follows as usual. Plain PyTorch::

    init = GradientInit(model)
    init.start()
    loss_fn(model(x), y).backward()
    init.finish()
    optimizer.step()

``LoRACallback`` does this on the first training step (the gradient averaged over DDP
ranks and every accumulated micro-batch). Layer types without the ``gradient_init``
flag (embeddings, whose ``B`` starts random; ``nn.MultiheadAttention``'s packed input
projection; its ``out_proj`` is a Linear and takes it), quantized bases (their weight has
no gradient) and DoRA keep the ``A`` they were injected with; :attr:`GradientInit.skipped`
says which and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .errors import ArgumentError, NoAdaptersError
from .layers.base import DEFAULT_ADAPTER, LoRALayer
from .registry import canonical_name, lora_layers

ROW_NORM = 3 ** -0.5
"""The norm of each row of ``A``: kaiming-uniform's (``a=√5``) expected row norm, whatever
the layer's width."""

EXACT_SVD_MAX = 2048
"""Matrices with both sides above this get a seeded randomized SVD (subspace iteration),
not a full one: a 4096 × 11008 gradient needs only its top ``r`` directions."""


@dataclass
class GradientInitReport:
    """What :meth:`GradientInit.finish` did: the layers whose ``A`` was set, and those left
    with their first ``A`` (by name, with the reason)."""

    initialised: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"A set from the first gradient on {len(self.initialised)} layer(s)"
        if self.kept:
            reasons = sorted(set(self.kept.values()))
            text += (f"; {len(self.kept)} kept the A they were injected with ({'; '.join(reasons)}: "
                     f"{sorted(self.kept)[:5]}{' ...' if len(self.kept) > 5 else ''})")
        return text


def gradient_init_reason(layer: LoRALayer, adapter: str) -> str | None:
    """Why ``layer``'s adapter cannot start from the weight gradient, or ``None``."""
    if not type(layer).gradient_init:
        return f"{type(layer).__name__}'s adapter does not start as B·A with B = 0"
    spec = layer.lora_specs[adapter]
    if spec.variant is not None:
        return f"{spec.variant.title} normalises the weight"
    w = layer.base_weight()
    if type(w) not in (Tensor, nn.Parameter) or not w.is_floating_point():
        return "a quantized base weight has no gradient"
    return None


def top_right_singular_vectors(m: Tensor, r: int) -> Tensor:
    """The ``min(r, rank)`` leading right singular vectors of the 2-D float ``m``, as rows.

    Exact (``torch.linalg.svd``) when a side is at most :data:`EXACT_SVD_MAX`; otherwise
    four rounds of subspace iteration from a fixed seed (the same input gives the same
    output, and the global random state is not touched)."""
    k = min(r, *m.shape)
    if min(m.shape) <= EXACT_SVD_MAX:
        return torch.linalg.svd(m, full_matrices=False).Vh[:k]
    gen = torch.Generator(device=m.device).manual_seed(0)
    q = torch.randn(m.shape[1], min(k + 10, min(m.shape)), generator=gen, device=m.device,
                    dtype=m.dtype)
    q = torch.linalg.qr(q).Q
    for _ in range(4):
        q = torch.linalg.qr(m.T @ (m @ q)).Q
    vh = torch.linalg.svd(m @ q, full_matrices=False).Vh[:k]  # Rayleigh-Ritz on span(q)
    return vh @ q.T


class GradientInit:
    """Set each adapted layer's ``A`` from its weight's gradient on one backward pass.

    Args:
        model: a model with LoRA injected.
        adapter: the adapter to initialise (``"default"``).

    Only adapters still at their start (``B`` all zero) are touched: the model's output is
    the same before and after. Raises :class:`NoAdaptersError` when ``model`` has no
    adapter ``adapter`` and :class:`ArgumentError` when none of its layers can start from
    a gradient (then :attr:`skipped` would hold them all).
    """

    def __init__(self, model: nn.Module, adapter: str = DEFAULT_ADAPTER) -> None:
        layers = {n: m for n, m in lora_layers(model).items() if adapter in m.lora_specs}
        if not layers:
            raise NoAdaptersError(
                f"GradientInit: the model has no LoRA adapter {adapter!r} (adapters found: "
                f"{sorted({a for m in lora_layers(model).values() for a in m.lora_specs})}); "
                "inject one first with inject_lora(model, config).")
        self.adapter = adapter
        self.layers: dict[str, LoRALayer] = {}
        self.skipped: dict[str, str] = {}
        for name, layer in layers.items():
            name = canonical_name(name)
            reason = gradient_init_reason(layer, adapter)
            if reason is None and bool(layer._ab(adapter)[1].any()):
                reason = "B is not zero (the adapter has trained)"
            if reason is None:
                self.layers[name] = layer
            else:
                self.skipped[name] = reason
        if not self.layers:
            reasons = sorted(set(self.skipped.values()))
            raise ArgumentError("GradientInit", "model", type(model).__name__, (
                f"none of its {len(layers)} layer(s) with adapter {adapter!r} can start from "
                f"a gradient ({'; '.join(reasons)}); use LoRAConfig(init='kaiming') for this "
                "model, or target Linear or Conv layers with a dense base"))
        self._started: dict[str, bool] = {}

    def start(self) -> None:
        """Make the base weights require grad, so the next backward computes them."""
        # Read every flag first: layers may share (tie) one weight tensor.
        self._started = {name: layer.base_weight().requires_grad
                         for name, layer in self.layers.items()}
        for layer in self.layers.values():
            w = layer.base_weight()
            w.grad = None
            w.requires_grad_(True)

    def cancel(self) -> None:
        """Freeze the base weights again and drop their gradients; ``A`` is unchanged."""
        for name, layer in self.layers.items():
            w = layer.base_weight()
            w.grad = None
            w.requires_grad_(self._started.get(name, False))
        self._started.clear()

    @torch.no_grad()
    def finish(self, reduce: Callable[[Tensor], Tensor] | None = None,
               grad_scale: float = 1.0,
               broadcast: Callable[[Tensor], Tensor] | None = None) -> GradientInitReport:
        """Set ``A`` from the gradients of the backward passes since :meth:`start`.

        Args:
            reduce: applied to each float32 gradient first (DDP: the mean over ranks).
            grad_scale: the gradients are divided by it (a GradScaler's loss scale).
            broadcast: applied to each new ``A`` (DDP: rank zero's copy to every rank).

        Returns a :class:`GradientInitReport`; the base weights are frozen again and their
        gradients dropped. Raises :class:`ArgumentError` if a gradient is not finite (an
        overflowing float16 step: call :meth:`cancel` and try the next batch).
        """
        if not self._started:
            raise ArgumentError("GradientInit.finish", "self", "not started",
                                "call start() before the backward pass, then finish()")
        if not (grad_scale > 0 and grad_scale != float("inf")):
            raise ArgumentError("GradientInit.finish", "grad_scale", grad_scale,
                                "expected a finite number > 0 (the loss scale)")
        report = GradientInitReport(kept=dict(self.skipped))
        # Check every gradient before changing anything (and on every rank alike).
        bad = [name for name, layer in self.layers.items()
               if (g := layer.base_weight().grad) is not None and not bool(torch.isfinite(g).all())]
        flag = torch.tensor([float(len(bad))], device=next(iter(self.layers.values()))
                            .base_weight().device)
        if bool((reduce(flag) if reduce is not None else flag).item() > 0):
            raise ArgumentError("GradientInit.finish", "gradient",
                                f"non-finite at {bad[:3] or 'another rank'}", (
                                    "finite weight gradients (a float16 loss scale overflowed: "
                                    "cancel() and try the next batch)"))
        for name, layer in self.layers.items():
            grad = layer.base_weight().grad
            g = (layer.out_first(grad).float().flatten(1) / grad_scale
                 if grad is not None else None)
            if reduce is not None:
                # Every rank must join the collective, even where this rank's loss did not
                # reach the layer.
                w = layer.base_weight()
                g = reduce(g if g is not None else torch.zeros(
                    layer.out_first(w).shape, device=w.device).flatten(1))
            if g is None or not bool(g.any()):
                report.kept[name] = "the loss did not reach it on this batch"
                continue
            self._set(layer, g, broadcast)
            report.initialised.append(name)
        self.cancel()
        return report

    def _set(self, layer: LoRALayer, g: Tensor,
             broadcast: Callable[[Tensor], Tensor] | None) -> None:
        a, b = layer._ab(self.adapter)
        r = a.shape[0]
        a2 = a.view(r, -1)
        vh = top_right_singular_vectors(g, r) * ROW_NORM
        if broadcast is not None:
            vh = broadcast(vh.contiguous())
        a2[: vh.shape[0]].copy_(vh.to(a.dtype))  # a rank above the matrix's keeps the rest
        # B's gradient for the new A: d/dB <G, s·B·A> = s·G·Aᵀ (A's gradient is s·Bᵀ·G = 0).
        scaling = layer.lora_specs[self.adapter].scaling
        b_grad = (g @ a2.float().T * scaling).view(b.shape).to(b.dtype)
        if b.grad is None:
            b.grad = b_grad
        else:
            b.grad.copy_(b_grad)
