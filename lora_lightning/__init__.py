"""lora-lightning: LoRA fine-tuning for PyTorch Lightning as a drop-in callback.

The core (config, layers, injection, merge, checkpoints, adapter files) is plain PyTorch;
the Lightning callback sits on top of it and the Hydra app on top of that.
"""

from .adapters import (
    active_adapters,
    delete_adapter,
    list_adapters,
    per_sample_adapters,
    set_adapter,
)
from .checkpoint.adapter_state import adapter_state_dict, load_adapter_state_dict
from .checkpoint.fingerprint import base_fingerprint
from .combine import combine_adapters
from .config import LoRAConfig
from .errors import (
    AdapterConflictError,
    AdapterFileError,
    AdapterLoadError,
    AdapterTensorError,
    ArgumentError,
    ArgumentTypeError,
    BaseWeightsInAdapterCheckpointError,
    CheckpointFieldError,
    CheckpointMismatchError,
    CheckpointReadError,
    ConfigError,
    FileAllocationError,
    LayerTypeError,
    LoRAError,
    MergedLayersError,
    MissingDependencyError,
    NoAdaptersError,
    OptimizerCoverageError,
    PatternError,
    PerSampleBatchError,
    PerSampleError,
    QuantizedMergeError,
    RankTooLargeError,
    StateDictMismatchError,
    TargetMatchError,
    TiedWeightError,
    UnsafeFileError,
    UnsupportedModuleError,
)
from .gradient_init import GradientInit, GradientInitReport
from .inject import InjectionReport, inject_lora, lora_layers
from .io.adapter_files import load_adapter, load_adapters, read_adapter, save_adapter, save_adapters
from .io.hotswap import hotswap_adapter
from .io.safe_load import read_checkpoint
from .layers import LoRALayer, LoRAVariant, layer_types, register_layer_type
from .merge import disable_adapters, merge_lora, merged_state_dict, unload_lora, unmerge_lora
from .optim import lora_param_groups
from .params import ParamCount, count_parameters
from .plan import InjectionPlan, plan_injection
from .registry import AdapterNameError

# isort: split
# Public for the examples (issue 17, item 5: they use only this API): the key of the LoRA
# metadata in a Lightning checkpoint, and which adapted modules share their weight tensor.
from .checkpoint.meta import META_KEY
from .merge import tied_weights

__version__ = "0.1.0"

# Lightning-facing names load lazily, so the plain-PyTorch core never imports Lightning.
_LAZY = {
    "LoRACallback": "lightning.callback",
    "load_lora_checkpoint": "lightning.loading",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterConflictError",
    "AdapterFileError",
    "AdapterLoadError",
    "AdapterNameError",
    "AdapterTensorError",
    "ArgumentError",
    "ArgumentTypeError",
    "BaseWeightsInAdapterCheckpointError",
    "CheckpointFieldError",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "ConfigError",
    "FileAllocationError",
    "GradientInit",
    "GradientInitReport",
    "InjectionPlan",
    "InjectionReport",
    "LayerTypeError",
    "LoRACallback",
    "LoRAConfig",
    "LoRAError",
    "LoRALayer",
    "LoRAVariant",
    "META_KEY",
    "MergedLayersError",
    "MissingDependencyError",
    "NoAdaptersError",
    "OptimizerCoverageError",
    "ParamCount",
    "PatternError",
    "PerSampleBatchError",
    "PerSampleError",
    "QuantizedMergeError",
    "RankTooLargeError",
    "StateDictMismatchError",
    "TargetMatchError",
    "TiedWeightError",
    "UnsafeFileError",
    "UnsupportedModuleError",
    "active_adapters",
    "adapter_state_dict",
    "base_fingerprint",
    "combine_adapters",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "hotswap_adapter",
    "inject_lora",
    "layer_types",
    "list_adapters",
    "load_adapter",
    "load_adapter_state_dict",
    "load_adapters",
    "load_lora_checkpoint",
    "lora_layers",
    "lora_param_groups",
    "merge_lora",
    "merged_state_dict",
    "per_sample_adapters",
    "plan_injection",
    "read_adapter",
    "read_checkpoint",
    "register_layer_type",
    "save_adapter",
    "save_adapters",
    "set_adapter",
    "tied_weights",
    "unload_lora",
    "unmerge_lora",
]
