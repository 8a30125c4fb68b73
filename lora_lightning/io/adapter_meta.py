"""This package's own metadata in an adapter directory: ``lora_lightning.json``.

Beside PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``, ``save_adapter``
writes ``lora_lightning.json``: the full :class:`~lora_lightning.LoRAConfig` the adapter was
saved with and, for a classifier, its head's label names::

    {"alpha": 16.0, "r": 8, ..., "label_names": ["negative", "positive"]}

PEFT never opens it (``PeftModel.from_pretrained`` warns about any key of
``adapter_config.json`` its ``LoraConfig`` lacks, so nothing of ours goes there), and a
directory without it (a PEFT adapter) loads the same. It is untrusted input like
``adapter_config.json``: size, nesting and digits are bounded, every key is checked, and a
malformed file is refused, naming it and the key, before anything changes a model; so is
something other than a regular file in its place. It holds the SHA-256 of the
``adapter_config.json`` saved with it: where another writer (PEFT's ``save_pretrained``, an
older lora-lightning) has replaced the adapter since and left this file behind, it is
ignored with a warning instead of lending its label names to another adapter.

Directories saved by earlier versions kept the same object as a ``"lora_lightning"``
section of ``adapter_config.json``; it is still read (never written), and where a directory
holds both they must agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import LoRAConfig
from ..errors import AdapterFileError, ArgumentError, ConfigError
from .peft_format import CONFIG_NAME, read_config_json

META_NAME = "lora_lightning.json"
"""The file of this package's metadata in an adapter directory."""
SECTION = "lora_lightning"
"""The ``adapter_config.json`` section where earlier versions kept the same metadata (read
for their directories, never written: PEFT warns about it)."""
LABELS_FIELD = "label_names"
PAIRED_FIELD = "adapter_config_sha256"
"""The SHA-256 of the ``adapter_config.json`` saved together with ``lora_lightning.json``."""
MAX_LABEL_CHARS = 200


def meta_text(config: LoRAConfig, label_names: Sequence[str] | None = None,
              config_text: str | None = None) -> str:
    """The text of ``lora_lightning.json`` for an adapter saved with ``config``;
    ``config_text``: the ``adapter_config.json`` written beside it, whose SHA-256 ties the
    two files together (:func:`read_meta` ignores the metadata when another writer, such
    as PEFT's ``save_pretrained``, has since replaced that file)."""
    data = config.to_dict()
    if label_names is not None:
        data[LABELS_FIELD] = list(label_names)
    if config_text is not None:
        data[PAIRED_FIELD] = hashlib.sha256(config_text.encode()).hexdigest()
    return json.dumps(data, indent=2, sort_keys=True)


def check_label_names(names: object, what: str, path: str | None = None,
                      field: str = LABELS_FIELD) -> list[str]:
    """``names`` as a list of at least two distinct non-empty strings of at most
    :data:`MAX_LABEL_CHARS` characters; else an :class:`ArgumentError` (``path`` None: an
    argument) or an :class:`AdapterFileError` naming the file ``path``, its ``field``, the
    value received and what would work."""
    problem = None
    if isinstance(names, str | bytes) or not isinstance(names, Sequence):
        problem = f"it is a {type(names).__name__}, not a list"
    elif len(names) < 2:
        problem = f"it holds {len(names)} name{'' if len(names) == 1 else 's'}"
    else:
        bad = [n for n in names if not isinstance(n, str) or not n or len(n) > MAX_LABEL_CHARS]
        if bad:
            problem = f"it holds {str(bad[0])[:40]!r}"
        elif len(set(names)) < len(names):
            problem = "it holds a name twice"
    if problem is None:
        return list(names)
    allowed = (f"{problem}; expected a list of at least two distinct class names (non-empty "
               f"strings of at most {MAX_LABEL_CHARS} characters) in the order of the head's "
               "outputs, such as ['negative', 'positive']")
    if path is None:
        raise ArgumentError("save_adapter", "label_names", names, allowed)
    shown = repr(names) if len(repr(names)) <= 200 else f"{repr(names)[:200]}..."
    raise AdapterFileError(f"{what} is {shown}: {allowed}.", path, field)


def _redo(path: str) -> str:
    return (f"save the adapter again with save_adapter, or delete {path} (the adapter loads "
            "without it; only its label names are lost)")


def _read(path: Path) -> Any:
    """``lora_lightning.json`` parsed as untrusted input (bounded like adapter_config.json)."""
    try:
        return read_config_json(path)
    except AdapterFileError as err:
        redo = _redo(str(path))
        raise AdapterFileError(f"{err} {redo[0].upper()}{redo[1:]}.", err.path) from err


def _check_meta(data: Any, path: str) -> dict[str, Any]:
    """A parsed ``lora_lightning.json``, every key checked: the :class:`LoRAConfig` fields
    and ``label_names``."""
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object of LoRAConfig fields and "
                               f"{LABELS_FIELD!r}, got {type(data).__name__}; {_redo(path)}.",
                               path)
    paired = data.get(PAIRED_FIELD)
    if paired is not None and not (isinstance(paired, str) and len(paired) == 64
                                   and all(c in "0123456789abcdef" for c in paired)):
        shown = repr(paired) if len(repr(paired)) <= 80 else f"{repr(paired)[:80]}..."
        raise AdapterFileError(f"{path}: field {PAIRED_FIELD!r} is {shown}: expected the "
                               f"64 hex digits of {CONFIG_NAME}'s SHA-256; {_redo(path)}.",
                               path, PAIRED_FIELD)
    fields = {k: v for k, v in data.items() if k not in (LABELS_FIELD, PAIRED_FIELD)}
    try:
        LoRAConfig.from_dict(fields)
    except ConfigError as err:
        raise AdapterFileError(f"{path}: field {err.field!r}: {err} Expected the LoRAConfig "
                               f"fields and {LABELS_FIELD!r} that save_adapter writes; "
                               f"{_redo(path)}.", path, err.field) from err
    if data.get(LABELS_FIELD) is not None:
        check_label_names(data[LABELS_FIELD], f"{path}: field {LABELS_FIELD!r}", path)
    return data


def read_meta(directory: str | os.PathLike, config_text: str,
              config_data: Any) -> dict[str, Any] | None:
    """The metadata ``save_adapter`` stored with the adapter in ``directory``: the checked
    ``lora_lightning.json`` if it was saved with the ``adapter_config.json`` whose text and
    parsed content the caller has read (``config_text``, ``config_data``), else an earlier
    version's ``"lora_lightning"`` section of that file, else None (a PEFT adapter). A
    malformed file, or the two holding different label names, is an
    :class:`AdapterFileError` naming the file."""
    directory = Path(directory)
    legacy = config_data.get(SECTION) if isinstance(config_data, dict) else None
    legacy = legacy if isinstance(legacy, dict) else None
    path = directory / META_NAME
    if os.path.lexists(path) and not path.is_file():
        raise AdapterFileError(
            f"{path}: not a regular file (a directory, a device, a pipe or a broken link); "
            f"expected the JSON file save_adapter writes; {_redo(str(path))}.", str(path))
    if not path.is_file():
        return legacy
    meta = _check_meta(_read(path), str(path))
    paired = meta.get(PAIRED_FIELD)
    if paired is not None:
        if hashlib.sha256(config_text.encode()).hexdigest() != paired:
            warnings.warn(
                f"{path} was saved with another {CONFIG_NAME} than the one now beside it "
                "(something else, such as PEFT's save_pretrained, has written the adapter "
                "since), so its label names and settings are ignored. Save the adapter with "
                f"lora_lightning's save_adapter to keep them, or delete {path}.",
                UserWarning, stacklevel=3)
            return legacy
    theirs = legacy.get(LABELS_FIELD) if isinstance(legacy, dict) else None
    if theirs is not None and theirs != meta.get(LABELS_FIELD):
        raise AdapterFileError(
            f"{path}: its label names {meta.get(LABELS_FIELD)} differ from {theirs}, in the "
            f"{SECTION!r} section of {directory / CONFIG_NAME} where an earlier lora-lightning "
            "version kept them: one of the two files is stale (the directory was saved by two "
            f"versions). Remove the section from {CONFIG_NAME}, or delete {META_NAME}, "
            "whichever is older.", str(path), LABELS_FIELD)
    return meta
