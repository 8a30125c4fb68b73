"""PEFT's on-disk adapter format: key names and ``adapter_config.json``, both ways.

Files use PEFT's key names (``base_model.model.<module>.lora_A.weight`` ...) and config
fields, so an adapter trained here loads with ``PeftModel.from_pretrained`` and a PEFT
adapter loads here. ``adapter_config.json`` holds PEFT's fields only (PEFT warns about
any other); this package's own metadata is a file beside it
(:mod:`lora_lightning.io.adapter_meta`). It is read as untrusted input: every field is
checked (type, range), a field this package does not know is refused, and a PEFT feature
it does not implement is refused rather than silently ignored; each error names the field
and the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..config import LoRAConfig
from ..errors import AdapterFileError, ConfigError
from ..layers import ADAPTER_PARAM_NAMES, DEFAULT_ADAPTER, VARIANTS, LoRALayer
from ..layers.base import param_names
from ..registry import canonical_name, lora_layers

CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."

# PEFT features this package does not implement: loading them would silently differ.
_UNSUPPORTED = (
    "layers_to_transform", "layers_pattern", "lora_bias", "target_parameters", "use_qalora",
    "alora_invocation_tokens", "trainable_token_indices", "layer_replication",
    "megatron_config", "use_bdlora", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "velora_config", "monteclora_config", "arrow_config", "kasa_config",
)
# Fields that describe the file or PEFT's runtime, not the adapter's math: type-checked,
# otherwise ignored.
_INFO_TYPES: dict[str, tuple[type, ...]] = {
    "peft_type": (str,), "task_type": (str, type(None)), "auto_mapping": (dict, type(None)),
    "peft_version": (str, type(None)), "base_model_name_or_path": (str, type(None)),
    "revision": (str, type(None)), "inference_mode": (bool,), "fan_in_fan_out": (bool,),
    "megatron_core": (str, type(None)), "runtime_config": (dict, type(None)),
    "ensure_weight_tying": (bool,), "qalora_group_size": (int,),
}
# File field -> LoRAConfig field, for the fields that define the adapter.
_TO_CONFIG = {
    "r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target_modules": "target_modules", "exclude_modules": "exclude_modules",
    "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
    "use_rslora": "use_rslora", "use_dora": "use_dora", "init_lora_weights": "init",
    "bias": "bias", "modules_to_save": "modules_to_save",
}
_REQUIRED = ("r", "lora_alpha", "target_modules")
KNOWN_FIELDS = frozenset(_UNSUPPORTED) | frozenset(_INFO_TYPES) | frozenset(_TO_CONFIG)
"""Every ``adapter_config.json`` field this package reads (PEFT 0.21's ``LoraConfig``)."""


# -- key translation ------------------------------------------------------------------
def _companions(layers: dict[str, LoRALayer]) -> set[str]:
    """Names of layers adapted as part of their parent (MultiheadAttention's out_proj)."""
    return {f"{n}.{child}" for n, m in layers.items() for child in type(m).companions(m)}


def _variant_leaves(adapter: str) -> dict[str, str]:
    """Our leaf name of each variant parameter of ``adapter`` -> PEFT's."""
    return {ours: theirs for v in VARIANTS.values()
            for ours, theirs in zip(v.param_names(adapter), v.peft_extra, strict=True)}


def to_peft_keys(model: nn.Module, state_dict: dict[str, Tensor],
                 adapter: str = DEFAULT_ADAPTER) -> dict[str, Tensor]:
    """Our keys of ``adapter``'s tensors -> PEFT's file keys (which never name the adapter:
    each adapter has its own file). Each layer type says how PEFT names its tensors."""
    layers = {canonical_name(n): m for n, m in lora_layers(model).items()}  # plain names
    companions = _companions(layers)
    a_name, b_name, _ = param_names(adapter)
    extra = _variant_leaves(adapter)
    out = {}
    for key, value in state_dict.items():
        key = canonical_name(key)
        owner, _, leaf = key.rpartition(".")
        layer = layers.get(owner)
        if owner in companions:  # PEFT wraps the parent, so the child sits under base_layer
            parent, _, child = owner.rpartition(".")
            owner = f"{parent}.base_layer.{child}"
        if layer is None:
            new = key
        elif leaf in (a_name, b_name):
            ab = "A" if leaf == a_name else "B"
            emb = type(layer).peft_embedding_keys
            new = f"{owner}.lora_embedding_{ab}" if emb else f"{owner}.lora_{ab}.weight"
        elif leaf in extra:
            new = f"{owner}.{extra[leaf]}"
        else:
            new = f"{owner}.base_layer.{leaf}"
        out[_PREFIX + new] = value
    return out


_FROM_PEFT = [
    (re.compile(r"\.lora_([AB])\.weight$"), r".lora_\1"),
    (re.compile(r"\.lora_embedding_([AB])$"), r".lora_\1"),
    *((re.compile(rf"\.{theirs}$"), f".{ours}") for v in VARIANTS.values()
      for ours, theirs in zip(v.extra, v.peft_extra, strict=True)),
    (re.compile(r"\.base_layer\."), "."),
]


def from_peft_keys(state_dict: dict[str, Tensor], adapter: str = DEFAULT_ADAPTER
                   ) -> dict[str, Tensor]:
    """PEFT's file keys -> our keys for ``adapter``'s tensors."""
    rename = dict(zip(ADAPTER_PARAM_NAMES, param_names(adapter), strict=True))
    out = {}
    for key, value in state_dict.items():
        new = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for pattern, repl in _FROM_PEFT:
            new = pattern.sub(repl, new)
        owner, _, leaf = new.rpartition(".")
        if leaf in rename:
            new = f"{owner}.{rename[leaf]}" if owner else rename[leaf]
        out[new] = value
    return out


# -- reading adapter_config.json --------------------------------------------------------
MAX_CONFIG_CHARS = 1 << 20
"""The longest ``adapter_config.json`` (or ``lora_lightning.json``) read (1 MiB; PEFT's are a
few kB)."""
MAX_NUMBER_DIGITS = 100
"""Longer integers in ``adapter_config.json`` are kept as an unusable placeholder, so the
field check that meets one names its field (``int()`` of 5,000 digits raises, naming none)."""


class _LongNumber(str):
    """An integer of more than :data:`MAX_NUMBER_DIGITS` digits, not converted."""

    def __repr__(self) -> str:
        return f"<a {len(self):,}-digit number>"


def _parse_int(text: str) -> int | _LongNumber:
    return int(text) if len(text.lstrip("-")) <= MAX_NUMBER_DIGITS else _LongNumber(text)


def _too_long(source: str, size: str) -> AdapterFileError:
    return AdapterFileError(f"{source}: {size}, more than the {MAX_CONFIG_CHARS:,} characters "
                            f"a {Path(source).name} may hold.", source)


def parse_config_json(text: str, source: str = CONFIG_NAME) -> Any:
    """Parse the text of an adapter directory's JSON file (``adapter_config.json``,
    ``lora_lightning.json``) as untrusted input.

    Every failure is one :class:`AdapterFileError` naming ``source``: invalid JSON, a file
    over :data:`MAX_CONFIG_CHARS`, nesting too deep for the parser (``RecursionError``).
    Huge integers are left for the field checks to refuse, naming their field.
    """
    if len(text) > MAX_CONFIG_CHARS:
        raise _too_long(source, f"{len(text):,} characters")
    try:
        return json.loads(text, parse_int=_parse_int)
    except RecursionError as err:
        raise AdapterFileError(f"{source}: not valid JSON for an adapter config (nested too "
                               "deeply to parse).", source) from err
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise AdapterFileError(f"{source}: not valid JSON ({err}).", source) from err


def read_config_text(path: Path) -> str:
    """The text of the JSON file ``path`` of an adapter directory, read as untrusted input:
    at most ``4 * MAX_CONFIG_CHARS`` bytes are read, so a huge file is refused without being
    loaded, and it must be UTF-8. Errors are :class:`AdapterFileError` naming it."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(4 * MAX_CONFIG_CHARS + 1)  # UTF-8: at most 4 bytes a character
        text = raw.decode("utf-8") if len(raw) <= 4 * MAX_CONFIG_CHARS else None
    except UnicodeDecodeError as err:
        raise AdapterFileError(f"{source}: not valid JSON ({err}).", source) from err
    except OSError as err:
        raise AdapterFileError(f"{source}: unreadable ({err}).", source) from err
    if text is None:
        raise _too_long(source, f"over {4 * MAX_CONFIG_CHARS:,} bytes")
    return text


def read_config_json(path: Path) -> Any:
    """Read (:func:`read_config_text`) and parse (:func:`parse_config_json`) the JSON file
    ``path`` of an adapter directory as untrusted input."""
    return parse_config_json(read_config_text(path), str(path))


# -- config translation ---------------------------------------------------------------
def to_peft_config(model: nn.Module, config: LoRAConfig, adapter: str = DEFAULT_ADAPTER
                   ) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` dict naming exactly the modules that carry ``adapter`` (as a
    full-match regex, so that no other module with the same name suffix is adapted)."""
    layers = {canonical_name(n): m for n, m in lora_layers(model).items()
              if adapter in m.lora_specs}
    for name in _companions(layers):  # PEFT adapts it as part of its parent
        layers.pop(name, None)
    specs = {n: m.lora_specs[adapter] for n, m in layers.items()}
    # Exact names only: a list would also match dotted suffixes ("lin" -> "block.lin"), and
    # both PEFT and we match rank/alpha keys against suffixes too, hence the "^" anchor.
    exact = {n: "^" + re.escape(n) for n in layers}
    rank_pattern = {exact[n]: s.r for n, s in specs.items() if s.r != config.r}
    alpha_pattern = {exact[n]: s.alpha for n, s in specs.items() if s.alpha != config.alpha}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": "|".join(re.escape(n) for n in sorted(layers)),
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "bias": config.bias,
        "modules_to_save": config.modules_to_save,
        "fan_in_fan_out": any(type(m).fan_in_fan_out for m in layers.values()),
    }


def _field_error(source: str, key: str, value: Any, allowed: str) -> AdapterFileError:
    return AdapterFileError(f"{source}: field {key!r} is {value!r}, {allowed}.", source, key)


def _check_fields(data: dict[str, Any], source: str) -> None:
    unknown = sorted(set(data) - KNOWN_FIELDS)
    if unknown:
        raise AdapterFileError(
            f"{source}: unknown field(s) {unknown}; an adapter_config.json holds PEFT "
            f"LoraConfig fields only ({len(KNOWN_FIELDS)} known). Remove them, or load this "
            "adapter with the tool that wrote it.", source, unknown[0])
    for key in _REQUIRED:
        if key not in data:
            raise AdapterFileError(f"{source}: required field {key!r} is missing.", source, key)
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(f"{source}: peft_type is {data.get('peft_type')!r}; only 'LORA' "
                               "adapters load here.", source, "peft_type")
    for key, types in _INFO_TYPES.items():
        if key in data and not isinstance(data[key], types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise _field_error(source, key, data[key], f"expected {names}")
    for key in _UNSUPPORTED:
        if data.get(key):
            raise _field_error(source, key, data[key],
                               "a PEFT feature lora-lightning does not implement; load this "
                               "adapter with PEFT instead")
    for key in ("use_rslora", "use_dora"):
        if not isinstance(data.get(key, False), bool):
            raise _field_error(source, key, data[key], "expected true or false")
    init = data.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise _field_error(source, "init_lora_weights", init,
                           "expected true, false or 'gaussian' (other PEFT initialisations "
                           "such as PiSSA change the base weights and are not supported)")


def from_peft_config(data: Any, source: str = CONFIG_NAME) -> LoRAConfig:
    """Build a :class:`LoRAConfig` from a PEFT ``adapter_config.json`` dict, validated field
    by field; an :class:`AdapterFileError` names the field and ``source``."""
    if not isinstance(data, dict):
        raise AdapterFileError(f"{source}: expected a JSON object, got {type(data).__name__}.",
                               source)
    _check_fields(data, source)
    init = data.get("init_lora_weights", True)
    values = {ours: data[theirs] for theirs, ours in _TO_CONFIG.items() if theirs in data}
    values["init"] = "gaussian" if init == "gaussian" else "kaiming"
    for key, empty in (("dropout", 0.0), ("rank_pattern", {}), ("alpha_pattern", {})):
        if values.get(key) is None:
            values[key] = empty
    try:
        return LoRAConfig(**values)
    except ConfigError as err:
        theirs = {v: k for k, v in _TO_CONFIG.items()}.get(err.field, err.field)
        raise AdapterFileError(f"{source}: invalid LoRA settings: {err} (file field "
                               f"{theirs!r})", source, theirs) from err
