"""Exception types of the core. Each carries the fields a caller needs to react to it, so
nobody has to match on message text.

``ConfigError`` is a ``ValueError`` (``ConfigTypeError`` also a ``TypeError``), so code that
caught the built-in types before keeps working.
"""

from __future__ import annotations

from typing import Any


class LoRAError(Exception):
    """Base class of every error lora-lightning raises on purpose."""


class ConfigError(LoRAError, ValueError):
    """A ``LoRAConfig`` field has a bad value.

    Attributes:
        field: the ``LoRAConfig`` field (``"r"``, ``"target_modules"`` ...).
        value: the value received.
        allowed: what would work, in words.
    """

    owner = "LoRAConfig"

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{self.owner}.{field}: got {value!r}; {allowed}.")


class ConfigTypeError(ConfigError, TypeError):
    """A ``LoRAConfig`` field has the wrong type."""


class TargetMatchError(ConfigError):
    """A target-like field (or one entry of it) matches no module of the model.

    Attributes:
        entry: the list entry or regex that matched nothing.
        candidates: real module names nearest to ``entry`` (or the first candidates).
    """

    def __init__(self, field: str, value: Any, entry: str, candidates: list[str],
                 allowed: str) -> None:
        self.entry, self.candidates = entry, list(candidates)
        self.field, self.value, self.allowed = field, value, allowed
        ValueError.__init__(self, f"{self.owner}.{field}: got {value!r}, {allowed}.")


class UnsupportedModuleError(LoRAError, TypeError):
    """A module chosen as a target cannot carry an adapter.

    Attributes:
        name: the module's qualified name.
        module_type: its type, as ``module.qualname``.
        reason: why it cannot be adapted and what to do instead, worded to follow the
            module's name (``"is a grouped convolution ..."``).
    """

    def __init__(self, name: str, module_type: str, reason: str) -> None:
        self.name, self.module_type, self.reason = name, module_type, reason
        super().__init__(f"target module {name!r} {reason}")


class TiedWeightError(LoRAError, ValueError):
    """Merging would write into a weight that another module shares.

    Attributes:
        name: the adapted module.
        shared_with: the other modules' parameter names that hold the same tensor.
    """

    def __init__(self, name: str, shared_with: list[str], hint: str) -> None:
        self.name, self.shared_with = name, list(shared_with)
        super().__init__(
            f"cannot merge the adapter of {name!r}: its weight is tied to {shared_with} "
            f"(the same tensor), so merging would silently change those modules too. {hint}"
        )


class AdapterLoadError(LoRAError, ValueError):
    """An adapter state dict or checkpoint does not fit the model it is loaded into."""


class StateDictMismatchError(AdapterLoadError, RuntimeError):
    """A checkpoint's state dict does not fit the model; refused before anything is copied.

    Also a ``RuntimeError``, the type torch's strict ``load_state_dict`` raises for the same
    problems (after copying every tensor that did fit).
    """


class AdapterTensorError(AdapterLoadError):
    """An adapter tensor that must not be loaded: not a dense float tensor of an adapter
    dtype, or holding NaN or infinite values.

    Attributes:
        source: the file (or ``"state_dict"``) it comes from.
        key: its state-dict key.
        reason: what is wrong with it, worded to follow "tensor <key>".
    """

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source, self.key, self.reason = source, key, reason
        super().__init__(f"{source}: tensor {key!r} {reason}. Nothing was loaded; the model "
                         "is unchanged.")


class RankTooLargeError(ConfigError):
    """A rank above both sizes of the layer it adapts and above the ranks always allowed
    (``inject.RANK_ALWAYS_ALLOWED``); a rank above the smaller size only is allowed with a
    warning, as PEFT allows it. Above both, a file could make us allocate any amount of
    memory for nothing.

    Attributes:
        layer: the module's qualified name.
        limit: the largest rank allowed there.
    """

    def __init__(self, layer: str, r: int, limit: int) -> None:
        self.layer, self.limit = layer, limit
        super().__init__("r", r, (
            f"{layer!r} gets rank {r}, larger than the layer allows (at most {limit}: the "
            "larger of its input and output sizes, or 64 on a small layer; a rank above the "
            "smaller size already adds nothing); refused before anything was allocated"))


class PerSampleBatchError(LoRAError, ValueError):
    """``per_sample_adapters`` got a list of adapter names whose length is not the batch's.

    Attributes:
        names: how many adapter names were given.
        batch: the batch size the layer received.
        layer: the layer that received it.
    """

    def __init__(self, names: int, batch: int, layer: str) -> None:
        self.names, self.batch, self.layer = names, batch, layer
        hint = ""
        if names and batch > names and batch % names == 0:
            k = batch // names
            hint = (f" If each sample became {k} rows (generate with num_beams={k} or "
                    f"num_return_sequences={k} repeats each one {k} times), repeat each name "
                    f"as many times: [n for n in names for _ in range({k})].")
        super().__init__(
            f"per_sample_adapters: adapter_names has {names} entries but {layer!r} received "
            f"a batch of {batch} samples; give one name (or None for the base model) per "
            f"sample, batch dimension first.{hint}")


class CheckpointMismatchError(LoRAError, ValueError):
    """A checkpoint was made for another rank, target set or base model."""


class BaseWeightsInAdapterCheckpointError(CheckpointMismatchError):
    """An adapter-only checkpoint that carries base weights: loading it would overwrite
    the model's own base silently, so it is refused.

    Attributes:
        source: the checkpoint.
        keys: the base-weight keys it carries.
    """

    def __init__(self, source: str, keys: list[str]) -> None:
        self.source, self.keys = source, list(keys)
        shown = ", ".join(repr(k) for k in self.keys[:5]) + (
            f" ... and {len(self.keys) - 5} more" if len(self.keys) > 5 else "")
        super().__init__(
            f"{source}: an adapter-only checkpoint (save_mode='adapter') carries base weights "
            f"{shown}, which it never saves; loading them would overwrite this model's base "
            "silently. Nothing was loaded. Load the base weights on their own (for example "
            "base_checkpoint=), or remove them from the file.")


class AdapterFileError(LoRAError, ValueError):
    """An adapter directory is missing, unreadable or not a LoRA adapter we support.

    Attributes:
        path: the file or directory at fault.
        field: the ``adapter_config.json`` field at fault, if one is (else ``None``).
    """

    def __init__(self, message: str, path: str | None = None, field: str | None = None) -> None:
        self.path, self.field = path, field
        super().__init__(message)


class CheckpointReadError(LoRAError, ValueError):
    """A checkpoint file is missing, truncated or not a checkpoint.

    Attributes:
        path: the file.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class UnsafeFileError(CheckpointReadError):
    """A file would run code or build objects beyond tensors and plain data when loaded.

    Raised before anything in the file is unpickled, so nothing in it runs.

    Attributes:
        path: the file.
        refused: the pickled globals (``module.name``) that are not on the allow-list.
    """

    def __init__(self, path: str, refused: list[str], what: str = "checkpoint") -> None:
        self.refused = list(refused)
        shown = ", ".join(self.refused[:8]) + (" ..." if len(self.refused) > 8 else "")
        super().__init__(
            f"{what} {path!r} was not loaded: it pickles {shown}, which loading with "
            "torch.load(weights_only=True) does not allow, and unpickling it could run code. "
            "Load only files you trust that way: pass trusted=True (for example "
            "load_lora_checkpoint(..., trusted=True), or trainer.fit(..., weights_only=False)) "
            "if you made this file yourself or trust who did.",
            path,
        )


class ArgumentError(LoRAError, ValueError):
    """A function argument has a bad value.

    Attributes:
        function: the function or class (``"load_adapter"``).
        argument: the argument's name.
        value: the value received.
        allowed: what would work, in words.
    """

    def __init__(self, function: str, argument: str, value: Any, allowed: str) -> None:
        self.function, self.argument, self.value, self.allowed = (
            function, argument, value, allowed)
        super().__init__(f"{function}.{argument}: got {value!r}; {allowed}.")


class ArgumentTypeError(ArgumentError, TypeError):
    """A function argument has the wrong type."""

    def __init__(self, function: str, argument: str, value: Any, allowed: str) -> None:
        super().__init__(function, argument, value, allowed)
        self.args = (f"{function}.{argument}: expected {allowed}, got "
                     f"{type(value).__name__}.",)


class NoAdaptersError(LoRAError, ValueError):
    """An operation needs LoRA layers (or adapters) and the model has none.

    Attributes:
        operation: what was asked (``"save_adapter"``).
    """

    def __init__(self, operation: str, what: str = "LoRA layers") -> None:
        self.operation = operation
        super().__init__(f"{operation}: the model has no {what}; call inject_lora(model, "
                         "config) first.")


class MergedLayersError(LoRAError, RuntimeError):
    """An operation that needs unmerged layers met merged ones: the one "layers are
    merged" error.

    Attributes:
        operation: what was refused.
        layers: the merged layers' names (empty when a single layer refuses).
        fix: what to do instead.
    """

    def __init__(self, operation: str, layers: list[str] | tuple[str, ...] = (),
                 fix: str = "call unmerge_lora(model) first") -> None:
        self.operation, self.layers, self.fix = operation, list(layers), fix
        where = (f"{len(self.layers)} layer(s) are merged (for example {self.layers[0]!r})"
                 if self.layers else "the layer is merged")
        super().__init__(f"{operation} is refused: {where}, and merged updates live in the "
                         f"weights. {fix[0].upper()}{fix[1:]}.")


class AdapterConflictError(LoRAError, ValueError):
    """An adapter name is already injected with other settings.

    Attributes:
        adapter: the adapter name.
        existing: what the model holds (a config, or a layer's settings).
        requested: what was asked for.
    """

    def __init__(self, adapter: str, existing: Any, requested: Any, message: str) -> None:
        self.adapter, self.existing, self.requested = adapter, existing, requested
        super().__init__(message)


class PerSampleError(LoRAError, RuntimeError):
    """A layer type that cannot apply a different adapter to each sample of a batch.

    Attributes:
        module_type: the base type's name.
    """

    def __init__(self, module_type: str, name: str | None = None) -> None:
        self.module_type, self.name = module_type, name
        where = f"{name!r} is an nn.{module_type}" if name else f"an nn.{module_type} layer"
        super().__init__(
            f"per_sample_adapters: {where}, whose adapter is applied as a weight update and "
            "cannot differ per sample; run one adapter at a time (set_adapter), or leave it "
            "out of the adapters' targets.")


class LayerTypeError(LoRAError, TypeError):
    """``register_layer_type`` got a pair of classes that cannot work together.

    Attributes:
        base_class: the module type received.
        lora_class: the LoRA type received.
    """

    def __init__(self, base_class: Any, lora_class: Any, allowed: str) -> None:
        self.base_class, self.lora_class = base_class, lora_class
        super().__init__(f"register_layer_type({base_class!r}, {lora_class!r}): {allowed}.")


class OptimizerCoverageError(LoRAError, RuntimeError):
    """Trainable parameters that no optimizer holds, so they would never train.

    Attributes:
        names: the parameters' names.
    """

    def __init__(self, names: list[str], message: str) -> None:
        self.names = list(names)
        super().__init__(message)


class CheckpointFieldError(CheckpointReadError):
    """A field of a checkpoint file has a value that is refused (wrong type, too large, an
    OmegaConf interpolation that would be resolved on load).

    Attributes:
        path: the file.
        field: the field, as a path of keys (``"hyper_parameters.net_cfg.token"``,
            ``"lora_lightning.ranks"``).
        value: the value found (shortened in the message).
    """

    def __init__(self, path: str, field: str, value: Any, problem: str) -> None:
        self.field, self.value = field, value
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        # ``path`` may already read "checkpoint '<file>'" (the Trainer's restore names it so)
        where = path if str(path).startswith("checkpoint") else f"checkpoint {path!r}"
        super().__init__(f"{where}: field {field!r} is {shown}; {problem}.", path)


class FileAllocationError(CheckpointReadError):
    """A pickled file asks for a large allocation from a few bytes (``bytearray(10**9)``);
    refused before anything is unpickled.

    Attributes:
        path: the file.
        calls: the calls found, as ``"builtins.bytearray(600000000)"``.
        limit: the most bytes one such call may ask for.
    """

    def __init__(self, path: str, calls: list[str], limit: int) -> None:
        self.calls, self.limit = list(calls), limit
        super().__init__(
            f"file {path!r} was not loaded: it pickles {', '.join(self.calls[:4])}, asking for "
            f"more than {limit:,} bytes from a few bytes of file; a checkpoint never does "
            "that, so nothing was unpickled.", path)


class PatternError(ConfigError):
    """A regex (``target_modules``, ``exclude_modules``, a ``rank_pattern`` or
    ``alpha_pattern`` key) is too long, or took too long to match a module name.

    Attributes:
        field: the ``LoRAConfig`` field.
        value: the pattern.
        allowed: what would work, in words.
    """


class MissingDependencyError(LoRAError, ImportError):
    """An optional package a feature needs is not installed.

    Attributes:
        feature: what was asked (``"LoRAConfig(quantize_base='nf4')"``).
        package: the package it needs.
        install: the command that installs it.
    """

    def __init__(self, feature: str, package: str, install: str) -> None:
        self.feature, self.package, self.install = feature, package, install
        super().__init__(f"{feature} needs {package}, which is not installed; install it with "
                         f"`{install}`.")


class QuantizedMergeError(LoRAError, RuntimeError):
    """Merging would write into quantized base weights, which rounds the merged weight to
    the quantization grid.

    Attributes:
        layers: the quantized layers' names.
        loss: what merging into them loses, in words.
    """

    def __init__(self, operation: str, layers: list[str], loss: str) -> None:
        self.operation, self.layers, self.loss = operation, list(layers), loss
        super().__init__(
            f"{operation} is refused: {len(self.layers)} layer(s) have a quantized base (for "
            f"example {self.layers[0]!r}), and {loss}. Pass requantize=True to merge into the "
            "quantized weights anyway, dequantize=True to merge into dense float32 weights "
            "(the layers stop being quantized), or export a dense merged model with "
            "merged_state_dict(model) or unload_lora(model, merge=True).")
