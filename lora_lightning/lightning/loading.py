"""Load a LoRA training checkpoint outside the Trainer, in one call.

``LightningModule.load_from_checkpoint`` runs no callbacks, so it cannot inject adapters
or refill the base weights an adapter-only checkpoint leaves out.
:func:`load_lora_checkpoint` does both.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, TypeVar

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.model_helpers import is_overridden

from ..checkpoint.checks import check_state_dict_fits, validate_meta
from ..checkpoint.meta import META_KEY
from ..checkpoint.restore import prepare_lora_state
from ..checkpoint.transaction import Transaction, model_transaction
from ..config import LoRAConfig
from ..errors import (
    CheckpointFieldError,
    CheckpointMismatchError,
    CheckpointReadError,
    ConfigError,
    TargetMatchError,
)
from ..inject import inject_lora
from ..io.safe_load import read_checkpoint
from ..layers.base import DEFAULT_ADAPTER
from ..merge import merge_lora
from ..registry import lora_layers, lora_param_keys, to_model_keys

__all__ = ["CheckpointReadError", "load_lora_checkpoint", "read_checkpoint"]

M = TypeVar("M", bound=LightningModule)

MAX_HPARAM_BYTES = 1 << 20
"""The longest ``str``, ``bytes`` or ``bytearray`` a checkpoint's hyperparameters may hold
(1 MiB); hyperparameters are settings, and a longer value is refused naming its key."""


def _raw(value: Any) -> Any:
    """``value`` as plain containers, OmegaConf interpolations left as their strings.

    OmegaConf is not imported here (the core never needs it): a file that holds its
    containers has imported it while being unpickled."""
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is not None and isinstance(value, omegaconf.Container):
        return omegaconf.OmegaConf.to_container(value, resolve=False)
    return value


def _problems(value: Any, key: str, depth: int = 0):
    """(key path, value, problem) for each refused value in the hyperparameters."""
    value = _raw(value)
    if depth > 100:
        yield key, "...", "nested more than 100 levels deep"
        return
    if isinstance(value, str | bytes | bytearray) and len(value) > MAX_HPARAM_BYTES:
        yield key, value[:40], (f"{len(value):,} long, above the {MAX_HPARAM_BYTES:,} a "
                                "hyperparameter may hold")
    elif isinstance(value, str) and "${" in value:
        yield key, value, ("an OmegaConf interpolation, which resolving would evaluate on this "
                           "machine (resolvers can read the environment or run code); it is "
                           "not resolved by default: pass the value yourself as a keyword "
                           "argument, or resolve_hparams=True if you trust the file")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _problems(v, f"{key}.{k}", depth + 1)
    elif isinstance(value, list | tuple | set | frozenset):
        for i, v in enumerate(value):
            yield from _problems(v, f"{key}[{i}]", depth + 1)


def hparams_from_file(ckpt: Mapping[str, Any], path: str, *, overridden: set[str] = frozenset(),
                      resolve: bool = False) -> dict[str, Any]:
    """A checkpoint's hyperparameters as constructor arguments, checked as untrusted input.

    Nothing is resolved while checking (OmegaConf containers are read with
    ``resolve=False``). A value holding an OmegaConf interpolation (``${...}``) is refused
    unless ``resolve``; so is a string or bytes value longer than :data:`MAX_HPARAM_BYTES`.
    Keys in ``overridden`` (given by the caller) are not read at all. Raises
    :class:`CheckpointFieldError` naming the file and the key.
    """
    key = LightningModule.CHECKPOINT_HYPER_PARAMS_KEY
    hparams = ckpt.get(key) or {}
    if not isinstance(hparams, Mapping):
        raise CheckpointFieldError(path, key, type(hparams).__name__,
                                   "expected a mapping of constructor arguments")
    raw = _raw(hparams)
    for name in raw:
        if name in overridden:
            continue
        for field, value, problem in _problems(raw[name], f"{key}.{name}"):
            if resolve and problem.startswith("an OmegaConf interpolation"):
                continue
            raise CheckpointFieldError(path, field, value, problem)
    return {k: v for k, v in dict(hparams).items() if k not in overridden}


def _config_from_meta(meta: Mapping[str, Any], path: str) -> LoRAConfig:
    """The checkpoint's ``LoRAConfig``; a bad value is refused naming the file and field."""
    if "config" not in meta:
        raise CheckpointFieldError(path, f"{META_KEY}.config", None,
                                   "missing; pass config=LoRAConfig(...) with the settings the "
                                   "checkpoint was trained with")
    try:
        return LoRAConfig.from_dict(meta["config"])
    except ConfigError as err:
        raise CheckpointFieldError(path, f"{META_KEY}.config.{err.field}", err.value,
                                   f"refused by LoRAConfig ({err})") from err


def load_lora_checkpoint(
    module_cls: type[M] | M,
    checkpoint_path: str | os.PathLike,
    *,
    config: LoRAConfig | None = None,
    base_checkpoint: str | os.PathLike | None = None,
    map_location: Any = "cpu",
    merge: bool = False,
    strict: bool = True,
    call_setup: bool = False,
    trusted: bool = False,
    resolve_hparams: bool = False,
    allow_nonfinite: bool = False,
    **init_kwargs: Any,
) -> M:
    """Build ``module_cls``, inject LoRA and load a checkpoint saved with ``LoRACallback``.

    Works for both ``save="adapter"`` and ``save="full"`` checkpoints. An adapter-only
    checkpoint needs the base weights: from the module's own constructor (for example a
    pretrained model loaded in ``__init__``) or from ``base_checkpoint`` (a Lightning
    checkpoint or a plain state dict of the un-injected module). The base is checked
    against the fingerprint stored at training time.

    Args:
        module_cls: the LightningModule class, or a module instance to load into (for
            example one that already carries another adapter: a checkpoint of a named
            adapter is added beside it, the others are left as they are).
        checkpoint_path: the LoRA checkpoint.
        config: needed only for checkpoints without LoRA metadata.
        base_checkpoint: where to take base weights from, if not from the constructor.
        merge: fold the adapters into the weights for zero-overhead inference. A quantized
            base (``quantize_base``, QLoRA) is dequantized to dense float32 first, so the
            merge is exact (``merge_lora(model, dequantize=True)``).
        strict: passed to ``load_state_dict``.
        call_setup: call ``setup("predict")`` first, for modules that build their model
            in ``setup`` (``configure_model`` is always called when overridden).
        trusted: load both files with ``torch.load(weights_only=False)``, which runs
            whatever they pickle. Only for files you made or trust; by default a file
            that pickles more than tensors and plain data is refused (``UnsafeFileError``).
        resolve_hparams: let the checkpoint's hyperparameters hold OmegaConf
            interpolations (``${oc.env:...}``, or any resolver registered in this process),
            resolved when the constructor reads them. Off by default: such a value is
            refused with :class:`CheckpointFieldError` naming its key, because resolving
            it runs on this machine whatever the file asks for.
        allow_nonfinite: load adapter tensors holding NaN or infinite values (refused by
            default, :class:`~lora_lightning.errors.AdapterTensorError`), for debugging.
        **init_kwargs: constructor arguments, overriding the checkpoint's hyperparameters.

    All-or-nothing: both files are checked (metadata, keys, shapes, tensor kinds and
    dtypes, finite adapter values, no base weights in an adapter-only checkpoint) before
    the first change, and if anything still fails, a module passed as an instance is
    restored exactly (parameters, classes, ``requires_grad`` flags, adapters).

    Returns:
        The module in eval mode, on ``map_location``.
    """
    ckpt = read_checkpoint(checkpoint_path, map_location, trusted=trusted)
    meta = ckpt.get(META_KEY)
    if meta is not None:
        validate_meta(meta, str(checkpoint_path))
    if not isinstance(ckpt.get("state_dict"), Mapping):
        raise CheckpointFieldError(str(checkpoint_path), "state_dict",
                                   type(ckpt.get("state_dict")).__name__,
                                   "expected a mapping of tensors (is this a Lightning checkpoint?)")
    if config is None:
        if meta is None:
            raise CheckpointMismatchError(
                f"load_lora_checkpoint: {str(checkpoint_path)!r} has no LoRA metadata; pass "
                "config=LoRAConfig(...) with the settings it was trained with."
            )
        config = _config_from_meta(meta, str(checkpoint_path))
    adapter = (meta or {}).get("adapter")
    instance = isinstance(module_cls, LightningModule)
    if instance:
        model, module_cls = module_cls, type(module_cls)
    else:
        hparams = hparams_from_file(ckpt, str(checkpoint_path), overridden=set(init_kwargs),
                                    resolve=resolve_hparams)
        model = module_cls(**{**hparams, **init_kwargs})
        if call_setup:
            model.setup("predict")
        if is_overridden("configure_model", model):
            model.configure_model()
    base_state = None
    if base_checkpoint is not None:
        base = read_checkpoint(base_checkpoint, map_location, trusted=trusted)
        base_state = base.get("state_dict", base)
    # A module built here is discarded if the load fails: only an instance needs its values
    # kept for the rollback.
    with model_transaction(model, values=instance) as tx:
        if base_state is not None:
            # an instance may carry adapters already: the base leaves them as they are
            _load_checked(tx, model, base_state, strict, str(base_checkpoint),
                          may_miss=lora_param_keys(model))
        try:
            inject_lora(model, config, adapter or DEFAULT_ADAPTER)
        except TargetMatchError as err:
            if call_setup or not is_overridden("setup", model):
                raise
            raise TargetMatchError(err.field, err.value, err.entry, err.candidates, (
                f"{err.allowed}. load_lora_checkpoint: {module_cls.__name__} overrides setup(); "
                "if it builds its model there, pass call_setup=True")) from err
        state = to_model_keys(model, ckpt["state_dict"])  # file keys -> this model's
        source = str(checkpoint_path)
        if meta is not None:
            prepare_lora_state(model, meta, state, source=source, strict=strict,
                               allow_nonfinite=allow_nonfinite)
        _load_checked(tx, model, state, strict, source)
        if merge:
            tx.keep(m.base_weight() for m in lora_layers(model).values())
            merge_lora(model, dequantize=True)
    return model.eval()


def _load_checked(tx: Transaction, model: LightningModule, state: dict[str, Any],
                  strict: bool, source: str, may_miss: set[str] = frozenset()) -> None:
    """A strict ``load_state_dict`` that cannot fail half-way: checked first (keys, shapes,
    tensor kinds), the tensors it writes kept for the rollback."""
    check_state_dict_fits(model, state, strict=strict, may_miss=may_miss, source=source)
    targets = model.state_dict(keep_vars=True)
    tx.keep(targets[k] for k in state if k in targets)
    model.load_state_dict(state, strict=strict)
