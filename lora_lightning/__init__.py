"""lora-lightning: LoRA fine-tuning for PyTorch Lightning as a drop-in callback.

The core (config, layers, injection, merge, checkpoints, adapter files) is plain PyTorch;
the Lightning callback sits on top of it and the Hydra app on top of that.
"""

from .adapter_io import AdapterFileError, load_adapter, read_adapter, save_adapter
from .checkpoint import (
    AdapterLoadError,
    CheckpointMismatchError,
    adapter_state_dict,
    base_fingerprint,
    load_adapter_state_dict,
)
from .config import LoRAConfig
from .errors import (
    ConfigError,
    LoRAError,
    TargetMatchError,
    TiedWeightError,
    UnsupportedModuleError,
)
from .inject import InjectionReport, inject_lora, lora_layers
from .params import ParamCount, count_parameters
from .plan import InjectionPlan, plan_injection
from .layer_base import LoRALayer
from .merge import disable_adapters, merge_lora, merged_state_dict, unload_lora, unmerge_lora

__version__ = "0.1.0"

# Lightning-facing names load lazily, so the plain-PyTorch core never imports Lightning.
_LAZY = {
    "LoRACallback": "callback",
    "load_lora_checkpoint": "loading",
    "read_checkpoint": "loading",
    "CheckpointReadError": "loading",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterFileError",
    "AdapterLoadError",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "InjectionReport",
    "LoRACallback",
    "LoRAConfig",
    "LoRALayer",
    "ParamCount",
    "adapter_state_dict",
    "base_fingerprint",
    "count_parameters",
    "disable_adapters",
    "inject_lora",
    "load_adapter",
    "load_adapter_state_dict",
    "load_lora_checkpoint",
    "lora_layers",
    "merge_lora",
    "merged_state_dict",
    "read_adapter",
    "read_checkpoint",
    "save_adapter",
    "unload_lora",
    "unmerge_lora",
]
