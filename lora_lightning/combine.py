"""Build a new adapter as a weighted combination of existing ones.

For each layer that carries any of the sources, with weights ``w_i`` and the sources'
scales ``s_i`` (alpha/r), the new adapter has scale 1 and:

* ``"cat"``: ``A = [A_1; A_2; ...]``, ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``, rank Σ r_i.
  Exact: ``B·A = Σ w_i s_i B_i A_i``.
* ``"svd"``: the best rank-``r`` approximation (truncated SVD, in float32) of
  ``Σ w_i s_i B_i A_i``. Exact when ``r`` reaches the rank of the sum.
* ``"linear"``: ``A = Σ c_i A_i``, ``B = Σ c_i B_i`` with ``c_i = sqrt(w_i s_i)`` (all
  sources of a layer must share its rank, and ``w_i >= 0``). As in PEFT, this mixes the
  factors, not the updates: it is not ``Σ w_i ΔW_i`` in general.

The new adapter can then be activated, merged, saved, or trained: ``inject_lora(model,
config, adapter=name)`` with the returned config makes it the active, trainable one and
keeps its values. DoRA sources are refused (their magnitude does not combine).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .config import LoRAConfig
from .errors import ArgumentError, MergedLayersError
from .layers import LoRALayer
from .registry import AdapterNameError, check_name, find_registry, known, lora_layers

COMBINATIONS = ("cat", "linear", "svd")


def _factors(layer: LoRALayer, sources: list[tuple[str, float]], how: str, r: int | None
             ) -> tuple[Tensor, Tensor]:
    """(A, B) of the combination on one layer, in float32."""
    parts = [(*(t.float() for t in layer._ab(n)), w * layer.lora_specs[n].scaling)
             for n, w in sources]
    if how == "cat":
        return (torch.cat([a for a, _, _ in parts], 0),
                torch.cat([b * ws for _, b, ws in parts], 1))
    if how == "linear":
        ranks = {a.shape[0] for a, _, _ in parts}
        if len(ranks) > 1:
            raise ArgumentError("combine_adapters", "combination", how,
                                f"'linear' needs equal ranks on a layer, and they are "
                                f"{sorted(ranks)}; use 'cat' or 'svd'")
        if any(ws < 0 for _, _, ws in parts):
            raise ArgumentError("combine_adapters", "combination", how,
                                "'linear' needs weights >= 0 (it takes square roots); use "
                                "'cat' or 'svd' for negative weights")
        return (sum(math.sqrt(ws) * a for a, _, ws in parts),
                sum(math.sqrt(ws) * b for _, b, ws in parts))
    a0, b0 = parts[0][0], parts[0][1]
    delta = sum(ws * (b.flatten(1) @ a.flatten(1)) for a, b, ws in parts)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(r, s.shape[0])
    a_new = vh[:k].reshape(k, *a0.shape[1:])
    b_new = (u[:, :k] * s[:k]).reshape(b0.shape[0], k, *b0.shape[2:])
    return a_new, b_new


def combine_adapters(model: nn.Module, adapters: Sequence[str], weights: Sequence[float],
                     name: str, combination: str = "cat", r: int | None = None
                     ) -> LoRAConfig:
    """Add adapter ``name`` = the weighted combination of ``adapters`` (see the module
    docstring). ``r`` is the rank for ``"svd"`` (default: the largest source rank).
    Returns the new adapter's config. Nothing changes if any check fails."""
    sources = [known(model, a) for a in adapters]
    check_name(name)
    reg = find_registry(model)
    if name in reg.configs:
        raise AdapterNameError(name, list(reg.configs), "a new name (that one exists; "
                               "delete_adapter it first to replace it)")
    if combination not in COMBINATIONS:
        raise ArgumentError("combine_adapters", "combination", combination,
                            f"expected one of {list(COMBINATIONS)}")
    if len(weights) != len(sources) or not sources:
        raise ArgumentError("combine_adapters", "weights", list(weights),
                            f"expected one weight per adapter ({len(sources)} adapter(s), at "
                            "least one)")
    if any(reg.configs[a].use_dora for a in sources):
        raise ArgumentError("combine_adapters", "adapters", list(adapters),
                            "DoRA adapters cannot be combined (their magnitude vectors do not "
                            "add up); combine plain LoRA adapters")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ArgumentError("combine_adapters", "r", r, "expected an integer >= 1")
    layers = {n: m for n, m in lora_layers(model).items()
              if any(a in m.lora_specs for a in sources)}
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise MergedLayersError("combine_adapters", merged)
    rank = r or max(reg.configs[a].r for a in sources)
    with torch.no_grad():
        made = {n: _factors(m, [(a, w) for a, w in zip(sources, weights, strict=True)
                                if a in m.lora_specs], combination, rank)
                for n, m in layers.items()}
    for n, (a, b) in made.items():
        layer = layers[n]
        k = a.shape[0]
        layer.add_adapter(name, k, float(k), 1.0, 0.0, "kaiming")
        new_a, new_b = layer._ab(name)
        with torch.no_grad():
            new_a.copy_(a.to(new_a.dtype))
            new_b.copy_(b.to(new_b.dtype))
        new_a.requires_grad_(False)
        new_b.requires_grad_(False)
    top = max(a.shape[0] for a, _ in made.values())
    pattern = {re.escape(n): a.shape[0] for n, (a, _) in made.items() if a.shape[0] != top}
    config = LoRAConfig(r=top, alpha=float(top), target_modules=sorted(made),
                        rank_pattern=pattern, alpha_pattern={k: float(v) for k, v in
                                                             pattern.items()})
    reg.configs[name] = config
    return config
