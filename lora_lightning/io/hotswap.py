"""``hotswap_adapter``: new values for an adapter, written into its existing tensors.

A compiled model (``torch.compile``) guards on which adapter is active and on each
layer's scale, a Python constant in its graph: ``set_adapter`` to another adapter compiles
a new graph (one per set of active adapters, cached after that; past dynamo's cache limit
the model runs uncompiled). A hot swap changes neither: it copies another adapter's values
into the active adapter's parameters in place, so the next call reuses the graph. The
ranks must agree layer by layer (the tensors keep their shapes); a different alpha is
folded into B (``B · s_new / s_old``), so each layer's ``s·B·A``, and the output, equals
the source's while the layer's scale stays what the graph holds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint.adapter_state import load_adapter_state_dict
from ..config import LoRAConfig
from ..errors import AdapterLoadError, ArgumentTypeError
from ..layers.base import DEFAULT_ADAPTER
from ..layers.names import param_names
from ..registry import canonical_name, known, lora_layers, state_keys, to_model_keys
from .adapter_files import WEIGHTS_NAME, read_adapter


def hotswap_adapter(model: nn.Module, source: str | os.PathLike | Mapping[str, Tensor],
                    adapter: str = DEFAULT_ADAPTER, *, trusted: bool = False,
                    allow_nonfinite: bool = False) -> nn.Module:
    """Load ``source`` into adapter ``adapter`` of ``model`` in place, without a recompile.

    ``source`` is an adapter directory (PEFT's format, as :func:`load_adapter` reads it) or
    a state dict keyed as :func:`adapter_state_dict` writes it (its alpha is taken to be the
    model's). Every layer must have the same rank in both; a different alpha (or
    ``rank_pattern``/``alpha_pattern`` value) is folded into B. All-or-nothing, like
    :func:`load_adapter_state_dict`: everything is checked first, and a refused swap leaves
    the model as it was. Raises :class:`AdapterLoadError` naming each layer whose rank
    differs.
    """
    known(model, adapter)
    config: LoRAConfig | None = None
    if isinstance(source, (str, os.PathLike)):
        config, state = read_adapter(source, trusted=trusted, adapter=adapter)
        where = str(Path(source) / WEIGHTS_NAME)
    elif isinstance(source, Mapping):
        state, where = dict(source), "state_dict"
    else:
        raise ArgumentTypeError("hotswap_adapter", "source", source,
                                "an adapter directory or a state dict of tensors")
    state = to_model_keys(model, state)
    keys = state_keys(model)
    wrong = []
    for name, layer in lora_layers(model).items():
        spec = layer.lora_specs.get(adapter)
        if spec is None:
            continue
        a_attr, b_attr, _ = param_names(adapter)
        a_key, b_key = keys[id(getattr(layer, a_attr))], keys[id(getattr(layer, b_attr))]
        a = state.get(a_key)
        if not isinstance(a, Tensor) or a.dim() == 0:
            continue  # a missing or malformed key: the strict load below names it
        if a.shape[0] != spec.r:
            wrong.append(f"{name} (rank {a.shape[0]} in the source, {spec.r} in the model)")
            continue
        if config is not None and isinstance(state.get(b_key), Tensor):
            cname = canonical_name(name)
            r, alpha = config.rank_for(cname), config.alpha_for(cname)
            ratio = config.scaling_for(r, alpha) / spec.scaling
            if ratio != 1.0:
                b = state[b_key]
                state[b_key] = (b.double() * ratio).to(b.dtype)
    if wrong:
        shown = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise AdapterLoadError(
            f"hotswap_adapter({where}): the ranks differ from adapter {adapter!r}'s: {shown}. "
            "A hot swap writes into the adapter's existing tensors, so each layer needs the "
            "same rank; load it as another adapter instead (load_adapter(model, directory, "
            "adapter='new_name')), which a compiled model recompiles for once.")
    with torch.no_grad():
        load_adapter_state_dict(model, state, adapter, allow_nonfinite=allow_nonfinite,
                                source=where)
    return model
