"""Merge and unmerge for LoRA layers: the merge formula ``W + Σ scale·B·A`` and DoRA's
per-output norm, each written once (a mixin of :class:`~lora_lightning.layer_base.LoRALayer`).

Merging folds the active adapters' updates into the weight in float32 and casts once;
several adapters merge together by adding their updates. A DoRA adapter merges only alone,
because its scale is a function of the whole weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _row_norm(w: Tensor) -> Tensor:
    """DoRA's norm: the L2 norm of each output's row of an out-first weight."""
    return w.flatten(1).norm(p=2, dim=1)


class MergeMixin:
    """Merge, unmerge and the update; the per-type layout comes from the layer."""

    lora_specs: dict[str, Any]  # name -> layer_base.AdapterSpec
    merged_adapters: list[str]
    _dora_merge_norm: Tensor | None

    # -- the update, written once -----------------------------------------------------
    def _update(self, names: list[str]) -> Tensor:
        """Σ scale·ΔW over ``names``, output dimension first, float32."""
        total = None
        for n in names:
            term = self.lora_specs[n].scaling * self._out_first(self._delta_native(*self._ab(n)))
            total = term if total is None else total + term
        return total

    def _combined(self, names: list[str]) -> Tensor:
        """W + Σ scale·ΔW with the output dimension first, in float32: the merge formula."""
        return self._out_first(self.weight).float() + self._update(names)

    def _merged_values(self, names: list[str]) -> tuple[Tensor, Tensor | None]:
        """What ``weight`` holds once ``names`` are merged (out-first, float32), and DoRA's
        norm."""
        new = self._combined(names)
        if not any(self.lora_specs[n].use_dora for n in names):
            return new, None
        norm = _row_norm(new)
        return new * self._dora_factor(names[0], norm), norm

    # -- DoRA ------------------------------------------------------------------------
    def _dora_weight_norm(self, name: str) -> Tensor:
        """Per-output L2 norm of W + scale·ΔW, computed in float32, shape (out,)."""
        return _row_norm(self._combined([name]))

    def _dora_factor(self, name: str, norm: Tensor) -> Tensor:
        """m / ‖W + ΔW‖ shaped to broadcast over the out-first weight, float32."""
        w_of = self._out_first(self.weight)
        factor = self._magnitude(name).reshape(-1).float() / norm
        return factor.reshape((-1,) + (1,) * (w_of.dim() - 1))

    # -- merge / unmerge -------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters into ``weight`` (the active ones by default; in float32, cast
        once). DoRA merges only alone: its scale is a function of the whole weight."""
        names = [n for n in (self._pending() if names is None else names)
                 if n not in self.merged_adapters]
        if not names:
            return
        together = self.merged_adapters + names
        if len(together) > 1 and any(self.lora_specs[n].use_dora for n in together):
            raise RuntimeError(
                f"cannot merge adapters {together} together: DoRA adapters merge only alone "
                "(their scale depends on the whole weight). Merge one, or keep them unmerged.")
        w = self.weight
        if self.merged_adapters:  # non-DoRA: the update adds up
            self._out_first(w).copy_((self._out_first(w).float() + self._update(names)
                                      ).to(w.dtype))
        else:
            new, self._dora_merge_norm = self._merged_values(names)
            self._out_first(w).copy_(new.to(w.dtype))
        self.merged_adapters = together

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged update from ``weight`` again. No-op if not merged."""
        if not self.merged_adapters:
            return
        w = self.weight
        cur = self._out_first(w).float()
        if self._dora_merge_norm is not None:
            cur = cur / self._dora_factor(self.merged_adapters[0], self._dora_merge_norm)
            self._dora_merge_norm = None
        cur = cur - self._update(self.merged_adapters)
        self._out_first(w).copy_(cur.to(w.dtype))
        self.merged_adapters = []

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The weight an un-injected module needs to compute this layer's output."""
        w = self.weight
        names = self._pending()
        if not names:
            return w.detach().clone()
        if self.merged_adapters:
            raise RuntimeError("merged_weight: some active adapters are merged and others "
                               "not; merge or unmerge them all first.")
        out = torch.empty_like(w)
        self._out_first(out).copy_(self._merged_values(names)[0].to(w.dtype))
        return out

