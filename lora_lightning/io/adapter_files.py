"""Adapter directories in PEFT's on-disk format: save, read, load into a model.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (key names and
fields translated by :mod:`lora_lightning.io.peft_format`), so an adapter trained here loads
with ``PeftModel.from_pretrained`` and a PEFT adapter loads here, and ``lora_lightning.json``,
this package's own metadata, which PEFT never opens (:mod:`lora_lightning.io.adapter_meta`).
The files are written through :mod:`lora_lightning.io.atomic`, so a crash mid-save never
leaves a half-written adapter. Only safetensors weights are read by default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapters import activate
from ..checkpoint.adapter_state import adapter_keys, adapter_state_dict, load_adapter_state_dict
from ..checkpoint.tensor_rules import tensor_problem
from ..checkpoint.transaction import model_transaction
from ..config import LoRAConfig
from ..errors import (
    AdapterFileError,
    AdapterLoadError,
    AdapterTensorError,
    ArgumentError,
    ConfigError,
    NoAdaptersError,
)
from ..inject import inject_lora
from ..layers.base import DEFAULT_ADAPTER, LoRALayer
from ..registry import (
    AdapterNameError,
    check_name,
    current_adapter,
    find_config,
    find_registry,
    known,
    lora_layers,
    lora_param_keys,
    to_model_keys,
)
from .adapter_meta import (
    LABELS_FIELD,
    META_NAME,
    SECTION,
    check_label_names,
    meta_text,
    read_meta,
)
from .atomic import write_files
from .peft_format import (
    CONFIG_NAME,
    from_peft_config,
    from_peft_keys,
    parse_config_json,
    read_config_text,
    to_peft_config,
    to_peft_keys,
)
from .safe_load import READ_ERRORS, torch_load

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"


def save_adapter(model: nn.Module, directory: str | os.PathLike, config: LoRAConfig | None = None,
                 adapter: str | None = None, *, label_names: Sequence[str] | None = None
                 ) -> Path:
    """Write ``adapter_config.json``, ``adapter_model.safetensors`` and
    ``lora_lightning.json`` to ``directory``.

    ``adapter`` names which adapter to write (default: the active one, or the only one).
    ``label_names``: the class names of a classifier adapter's head (``modules_to_save``),
    in output order; they travel in ``lora_lightning.json`` (this package's metadata beside
    PEFT's files, which PEFT never reads; :mod:`lora_lightning.io.adapter_meta`) and
    :func:`read_label_names` gives them back, so an adapter trained on other classes than
    the base model answers with its own names (the server does). The files are written to
    temporary names first and renamed only once all are complete, so a crash or a full
    disk mid-save leaves the previous adapter loadable.
    """
    from safetensors.torch import save_file

    if label_names is not None:
        label_names = check_label_names(label_names, "label_names")
    if adapter is not None:
        known(model, adapter)
    name = adapter or current_adapter(model)
    config = config or find_config(model, name)
    if config is None or not lora_layers(model):
        raise NoAdaptersError("save_adapter")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    single = len(find_registry(model).configs) == 1 and adapter is None
    state = adapter_state_dict(model, None if single else name)
    tensors = {
        k: v.detach().cpu().contiguous().clone()
        for k, v in to_peft_keys(model, state, name).items()
    }
    text = json.dumps(to_peft_config(model, config, name), indent=2, sort_keys=True)
    meta = meta_text(config, label_names, text)
    write_files([(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p))),
                 (directory / CONFIG_NAME, lambda p: Path(p).write_text(text, encoding="utf-8")),
                 (directory / META_NAME, lambda p: Path(p).write_text(meta, encoding="utf-8"))],
                f"save_adapter wrote nothing; the adapter in {directory} is unchanged")
    return directory


def read_adapter(directory: str | os.PathLike, *, trusted: bool = False,
                 adapter: str = DEFAULT_ADAPTER) -> tuple[LoRAConfig, dict[str, Tensor]]:
    """Read an adapter directory into a config and a state dict with our key names.

    Weights are read from ``adapter_model.safetensors``. A directory with only PEFT's older
    pickled ``adapter_model.bin`` needs ``trusted=True`` (a pickle can run code). The
    metadata in ``lora_lightning.json``, where present, is checked too (it is not needed to
    load). Each problem is reported once, naming the file and what is wrong with it.
    """
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    text, data = _config_json(directory)
    peft = {k: v for k, v in data.items() if k != SECTION} if isinstance(data, dict) else data
    config = from_peft_config(peft, str(cfg_path))  # without an earlier version's section
    read_meta(directory, text, data)  # a malformed lora_lightning.json is refused too
    return config, from_peft_keys(_read_weights(directory, trusted), adapter)


def _config_json(directory: Path) -> tuple[str, object]:
    """The text of ``adapter_config.json`` in ``directory`` and its parsed content, read as
    untrusted input."""
    if not directory.is_dir():
        raise AdapterFileError(f"adapter directory {str(directory)!r} does not exist.",
                               str(directory))
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFileError(f"{cfg_path}: missing; an adapter directory needs {CONFIG_NAME}.",
                               str(cfg_path))
    text = read_config_text(cfg_path)  # bounded: size, UTF-8
    return text, parse_config_json(text, str(cfg_path))  # bounded: depth, digits


def read_label_names(directory: str | os.PathLike) -> list[str] | None:
    """The class names ``save_adapter(..., label_names=...)`` stored with the adapter in
    ``directory`` (``lora_lightning.json``; an earlier version's section of
    ``adapter_config.json``), or None when it stores none (a PEFT adapter, or one saved
    without). A malformed list is an :class:`AdapterFileError` naming the file and the
    field."""
    directory = Path(directory)
    meta = read_meta(directory, *_config_json(directory))  # lora_lightning.json checked whole
    names = meta.get(LABELS_FIELD) if meta is not None else None
    if names is None or (directory / META_NAME).is_file():
        return names
    cfg_path, field = str(directory / CONFIG_NAME), f"{SECTION}.{LABELS_FIELD}"
    return check_label_names(names, f"{cfg_path}: field {field}", cfg_path, field)


def _read_weights(directory: Path, trusted: bool) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    weights_path, pickled = directory / WEIGHTS_NAME, directory / PICKLED_WEIGHTS_NAME
    if weights_path.is_file():
        try:
            return load_file(str(weights_path))
        except Exception as err:  # safetensors raises its own error types on corrupt files
            raise AdapterFileError(
                f"{weights_path}: unreadable safetensors file (truncated or corrupted?): {err}",
                str(weights_path)) from err
    if not pickled.is_file():
        raise AdapterFileError(f"{weights_path}: missing; the adapter has no weights file.",
                               str(weights_path))
    if not trusted:
        raise AdapterFileError(
            f"{pickled}: a pickled adapter (PEFT's older format), which can run code when "
            f"loaded; only {WEIGHTS_NAME} is read by default. Pass trusted=True to "
            "load_adapter/read_adapter if you trust who made it, or convert it to safetensors "
            "where you do.", str(pickled))
    try:
        tensors = torch_load(pickled, "cpu", trusted=True, what="adapter")
    except READ_ERRORS as err:
        raise AdapterFileError(f"{pickled}: unreadable ({type(err).__name__}: {err}).",
                               str(pickled)) from err
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise AdapterFileError(f"{pickled}: holds a {type(tensors).__name__}, not a mapping of "
                               "tensors.", str(pickled))
    return tensors


BASE_WEIGHT_RULES = ("check", "apply")


def _base_weights(model: nn.Module, state: dict[str, Tensor], rule: str,
                  source: str, adapter: str | None = None) -> dict[str, Tensor]:
    """Take out of ``state`` the frozen base weights of adapted layers that PEFT saves
    (``embed_tokens.base_layer.weight`` under ``save_embedding_layers="auto"``).

    ``"check"``: each must equal the model's own, else the load is refused naming the key.
    ``"apply"``: they are returned, to be copied into the base once the adapter fits.
    """
    trained = set(adapter_keys(model, adapter)) | lora_param_keys(model)
    params = dict(model.named_parameters())
    base_keys = {f"{n}.{leaf}" for n, m in lora_layers(model).items()
                 for leaf, _ in m.named_parameters(recurse=False)} - trained
    found = {k: state.pop(k) for k in sorted(set(state) & base_keys)}
    for key, value in found.items():
        mine = params[key]
        problem = tensor_problem(value, mine)
        if problem:
            raise AdapterTensorError(source, key, problem)
        if rule == "apply" and value.shape != mine.shape:
            raise AdapterLoadError(
                f"{source}: base weight {key!r} in the adapter file has shape "
                f"{tuple(value.shape)}, the model's has {tuple(mine.shape)}; resize the model "
                "first. Nothing was loaded; the model is unchanged.")
    if rule == "check":
        for key, value in found.items():
            mine = params[key]
            if value.shape != mine.shape or not torch.equal(value.to(mine.dtype), mine.detach()):
                raise AdapterLoadError(
                    f"{source}: the adapter file holds the base weight {key!r} (PEFT saves "
                    f"embedding layers with the adapter), shape {tuple(value.shape)}, and it "
                    f"differs from this model's ({tuple(mine.shape)}). Load it with "
                    "load_adapter(..., base_weights='apply') to use the saved weight, or load "
                    "the adapter into the base model it was trained on."
                )
        return {}
    return found


def load_adapter(model: nn.Module, directory: str | os.PathLike,
                 base_weights: str = "check", *, trusted: bool = False,
                 adapter: str | None = None, replace: bool = False,
                 allow_nonfinite: bool = False) -> nn.Module:
    """Load a PEFT-format adapter into ``model``, injecting LoRA first if needed.

    Without ``adapter``, a model that already carries adapters must match the file's
    layout (its values are replaced). With ``adapter="name"``, the file becomes that
    adapter: a new one is added beside the others (they stay as they are and stay active;
    switch with ``set_adapter``); a name the model already holds is refused unless
    ``replace=True``, which loads the file's values into it. Base weights that PEFT saves
    beside the adapter (embedding layers) are checked against the model's
    (``base_weights="check"``, a difference is refused) or copied into it (``"apply"``);
    no other base weight is ever touched.

    The load is all-or-nothing: the file is checked (config fields, ranks against the
    layers before anything is allocated, keys, shapes, dtypes, finite values; NaN and
    infinite values pass only with ``allow_nonfinite=True``) before the first change, and
    if anything still fails the model is restored exactly (parameters, classes,
    ``requires_grad`` flags, adapters). Refusals are :class:`AdapterFileError` (the file:
    its path, and the config field at fault) or :class:`AdapterLoadError` (the adapter
    does not fit the model).
    """
    if base_weights not in BASE_WEIGHT_RULES:
        raise ArgumentError("load_adapter", "base_weights", base_weights,
                            f"expected one of {list(BASE_WEIGHT_RULES)}")
    name = check_name(adapter) if adapter is not None else DEFAULT_ADAPTER
    config, state = read_adapter(directory, trusted=trusted, adapter=name)
    source = str(Path(directory) / WEIGHTS_NAME)
    reg = find_registry(model)
    exists = adapter is not None and reg is not None and name in reg.configs
    if exists and not replace:
        raise AdapterNameError(name, list(reg.configs), (
            f"the model already holds adapter {name!r}; pass replace=True to load "
            f"{directory} into it, or choose another name"))
    into_existing = exists or (
        adapter is None and any(isinstance(m, LoRALayer) for m in model.modules()))
    flags = {id(p): p.requires_grad for p in model.parameters()}
    previous = list(reg.active) if reg is not None and reg.configs else None
    with model_transaction(model) as tx:
        if not into_existing:
            _inject_from_file(model, config, name, str(Path(directory) / CONFIG_NAME))
        state = to_model_keys(model, state)  # plain names in the file -> this model's keys
        base = _base_weights(model, state, base_weights, source, adapter)
        load_adapter_state_dict(model, state, adapter, allow_nonfinite=allow_nonfinite,
                                source=source)
        params = dict(model.named_parameters())
        tx.keep(params[key] for key in base)
        with torch.no_grad():
            for key, value in base.items():
                params[key].copy_(value)
        if not into_existing and previous is not None:
            activate(model, previous)  # loading adds an adapter; it does not switch to it
            _restore_flags(model, flags)
    return model


def _inject_from_file(model: nn.Module, config: LoRAConfig, name: str, source: str) -> None:
    """``inject_lora`` for a file's config: a config the model cannot take (a target it
    lacks, a rank larger than a layer) is refused naming the file and the field."""
    try:
        inject_lora(model, config, name)
    except ConfigError as err:
        raise AdapterFileError(f"{source}: field {err.field!r} does not fit this model: {err}",
                               source, err.field) from err


def _restore_flags(model: nn.Module, flags: dict[int, bool]) -> None:
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), False))


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Save every adapter in PEFT's multi-adapter layout: ``default`` in ``directory``,
    each other adapter in ``directory/<name>``. Returns the names saved.

    A name too long for a folder name on that file system is refused before anything is
    written."""
    names = list(find_registry(model).configs) if find_registry(model) else []
    if not names:
        raise NoAdaptersError("save_adapters", "adapters")
    most = _name_max(Path(directory))
    for name in names:
        if name != DEFAULT_ADAPTER and len(name.encode()) > most:
            raise AdapterNameError(name, names, (
                f"save_adapters: adapter name of {len(name.encode())} bytes is longer than a "
                f"folder name may be here ({most}); nothing was written. Rename it (load or "
                "save it under a shorter name)"))
    for name in names:
        target = Path(directory) if name == DEFAULT_ADAPTER else Path(directory) / name
        save_adapter(model, target, adapter=name)
    return names


def _name_max(directory: Path) -> int:
    """The longest file name the file system holding ``directory`` allows (255 if unknown)."""
    probe = next((p for p in (directory, *directory.parents) if p.exists()), None)
    try:
        return os.pathconf(probe, "PC_NAME_MAX") if probe is not None else 255
    except (OSError, ValueError, AttributeError):
        return 255


def load_adapters(model: nn.Module, directory: str | os.PathLike, **kwargs) -> list[str]:
    """Load PEFT's multi-adapter layout (see :func:`save_adapters`): the adapter at the top
    as ``default``, each subfolder holding an ``adapter_config.json`` under its name.
    Keyword arguments go to :func:`load_adapter`. Returns the names loaded.

    All-or-nothing: a refused subfolder leaves none of the set loaded (the model is
    restored exactly, as by each :func:`load_adapter`)."""
    directory = Path(directory)
    found = ([(DEFAULT_ADAPTER, directory)] if (directory / CONFIG_NAME).is_file() else []) + [
        (sub.name, sub) for sub in sorted(directory.iterdir()) if (sub / CONFIG_NAME).is_file()]
    if not found:
        raise AdapterFileError(f"{directory}: no {CONFIG_NAME} at the top or in a subfolder; "
                               "not an adapter directory.", str(directory))
    for name, _ in found:
        check_name(name)
    with model_transaction(model):
        for name, path in found:
            load_adapter(model, path, adapter=name, **kwargs)
    return [n for n, _ in found]
