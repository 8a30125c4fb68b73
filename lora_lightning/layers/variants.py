"""Adapter variants: what changes when an adapter is not plain ``W + s·B·A``.

A variant is an object attached to one adapter of one layer (its
:class:`~lora_lightning.layers.base.AdapterSpec`). The layer asks it for the extra
parameters it owns, what the adapter adds to the base output, and how to merge and unmerge
it; plain LoRA has no variant. DoRA is the first variant; adding another is one subclass
here and one entry in :data:`VARIANTS` (see ``docs/extending.md``).

DoRA (Liu et al., 2024) splits the adapted weight into a direction and a magnitude::

    W' = m · (W + s·B·A) / ‖W + s·B·A‖          (norm per output, computed in float32)

with a trainable magnitude ``m`` per output, initialised to ‖W‖ so that the model starts
unchanged. As in PEFT, the norm is detached in the forward pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from .names import DEFAULT_ADAPTER

if TYPE_CHECKING:  # pragma: no cover
    from .base import LoRALayer


def row_norm(w: Tensor) -> Tensor:
    """The L2 norm of each output's row of an out-first weight."""
    return w.flatten(1).norm(p=2, dim=1)


class LoRAVariant:
    """What a variant overrides. Stateless: per-layer state lives in the layer's
    parameters, named by :meth:`param_names`."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    """How messages name it (``"DoRA"``)."""
    extra: ClassVar[tuple[str, ...]] = ()
    """Leaf names of the extra parameters, for the ``default`` adapter (``lora_magnitude``);
    another adapter ``x`` uses ``lora_magnitude_x``."""
    peft_extra: ClassVar[tuple[str, ...]] = ()
    """PEFT's names for the same parameters, in the same order."""
    merges_alone: ClassVar[bool] = False
    """Whether it merges only as the single adapter of a weight."""

    def param_names(self, adapter: str) -> tuple[str, ...]:
        return self.extra if adapter == DEFAULT_ADAPTER else tuple(
            f"{n}_{adapter}" for n in self.extra)

    def unsupported(self, layer_cls: type) -> str | None:
        """Why ``layer_cls`` cannot carry this variant (worded to follow a module's name), or
        ``None``."""
        if self.name not in layer_cls.supported_variants:
            base = layer_cls._lora_base_class.__name__
            return (f"is an nn.{base}, which {self.title} does not support; use "
                    f"use_{self.name}=False or exclude it")
        return None

    def create(self, layer: LoRALayer, adapter: str) -> None:
        """Add this variant's parameters to ``layer`` (A and B already exist)."""

    def delta(self, layer: LoRALayer, adapter: str, x: Tensor, xd: Tensor, base_out: Tensor,
              lora: Tensor) -> Tensor:
        """What the adapter adds to ``base_out``; ``lora`` is the unscaled ``B(A xd)``."""
        raise NotImplementedError

    def merged(self, layer: LoRALayer, adapter: str, combined: Tensor) -> tuple[Tensor, Tensor]:
        """The out-first float32 weight once merged, and the state :meth:`unmerged` needs."""
        raise NotImplementedError

    def unmerged(self, layer: LoRALayer, adapter: str, current: Tensor, state: Tensor) -> Tensor:
        """Undo :meth:`merged` on the out-first float32 ``current`` (giving W + s·B·A)."""
        raise NotImplementedError


class DoRA(LoRAVariant):
    """Weight-decomposed LoRA: a trainable magnitude per output (see the module docstring)."""

    name = "dora"
    title = "DoRA"
    extra = ("lora_magnitude",)
    peft_extra = ("lora_magnitude_vector",)
    merges_alone = True

    def weight_norm(self, layer: LoRALayer, adapter: str) -> Tensor:
        """‖W + s·B·A‖ per output, float32, shape (out,)."""
        return row_norm(layer.combined_weight([adapter]))

    def create(self, layer: LoRALayer, adapter: str) -> None:
        with torch.no_grad():
            norm = self.weight_norm(layer, adapter)
        dtype = layer.adapter_dtype(layer.lora_specs[adapter].dtype_rule)
        setattr(layer, self.param_names(adapter)[0],
                nn.Parameter(norm.reshape(layer.magnitude_shape()).to(dtype, copy=True)))

    def magnitude(self, layer: LoRALayer, adapter: str) -> Tensor:
        return getattr(layer, self.param_names(adapter)[0])

    def delta(self, layer, adapter, x, xd, base_out, lora):
        spec = layer.lora_specs[adapter]
        m = self.magnitude(layer, adapter)
        scale = m / self.weight_norm(layer, adapter).detach().to(m.dtype).view_as(m)
        if xd is x:
            base_d = base_out if layer.bias is None else base_out - layer.bias_view()
        else:  # dropout: the direction term needs W applied to the dropped input
            base_d = layer.base_without_bias(xd)
        return (scale - 1) * base_d + scale * (spec.scaling * lora)

    def _factor(self, layer: LoRALayer, adapter: str, norm: Tensor) -> Tensor:
        """m / ‖W + s·B·A‖ shaped to broadcast over the out-first weight, float32."""
        w_of = layer.out_first(layer.base_weight())
        factor = self.magnitude(layer, adapter).reshape(-1).float() / norm
        return factor.reshape((-1,) + (1,) * (w_of.dim() - 1))

    def merged(self, layer, adapter, combined):
        norm = row_norm(combined)
        return combined * self._factor(layer, adapter, norm), norm

    def unmerged(self, layer, adapter, current, state):
        return current / self._factor(layer, adapter, state)


VARIANTS: dict[str, LoRAVariant] = {"dora": DoRA()}
"""Variant name -> the variant object every layer shares."""


def variant_for(config) -> LoRAVariant | None:
    """The variant a :class:`~lora_lightning.config.LoRAConfig` asks for (``None``: plain
    LoRA)."""
    return VARIANTS["dora"] if config.use_dora else None
