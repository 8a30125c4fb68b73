"""The restore sequence for a checkpoint's state dict, written once.

Both the Trainer path (the module hook ``LoRACallback`` installs) and
``load_lora_checkpoint`` call these before the strict ``load_state_dict``:

* a LoRA checkpoint: check its metadata (rank, targets, base fingerprint) → check that it
  holds every adapter tensor → refuse base weights in an adapter-only checkpoint, then
  refill them from the model → check that keys, shapes and tensor kinds fit → check the
  adapter tensors' dtypes and values (finite);
* a checkpoint without LoRA (a base model): check that it fits, letting exactly the
  adapter keys be missing (they keep their fresh initialisation).

Each check raises before anything is copied, so a refused load leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from ..registry import lora_param_keys
from .adapter_state import adapter_keys, check_adapter_tensors
from .checks import (
    check_adapter_keys_present,
    check_meta,
    check_no_base_weights,
    check_state_dict_fits,
)
from .meta import fill_base_keys


def prepare_lora_state(model: nn.Module, meta: Mapping, state_dict: dict[str, Tensor], *,
                       source: str, strict: bool = True, check_fit: bool = True,
                       allow_nonfinite: bool = False) -> None:
    """Make a LoRA checkpoint's ``state_dict`` ready for a strict load into ``model``."""
    adapter = meta.get("adapter")
    check_meta(model, meta, source=source)
    check_adapter_keys_present(model, state_dict, source=source, adapter=adapter)
    if meta.get("mode") == "adapter":
        check_no_base_weights(model, state_dict, adapter, source=source)
        fill_base_keys(model, state_dict, adapter)
    if check_fit:
        check_state_dict_fits(model, state_dict, strict=strict, source=source)
        check_adapter_tensors(state_dict, model.state_dict(keep_vars=True),
                              set(adapter_keys(model, adapter)), source, allow_nonfinite)


def prepare_base_state(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str,
                       strict: bool = True, check_fit: bool = True) -> int:
    """Check a base (non-LoRA) state dict against ``model``; return how many adapter keys it
    lacks (the layers' load hooks let exactly those be missing)."""
    adapter = lora_param_keys(model)
    if check_fit:
        check_state_dict_fits(model, state_dict, strict=strict, may_miss=adapter, source=source)
    return sum(1 for k in adapter if k not in state_dict)
