"""``LoRAConfig``: what to adapt and how, validated when it is built.

Every invalid value raises ``ValueError`` (or ``TypeError`` for a wrong type) naming the
field, the value received and what is allowed, so a bad config fails at construction and
never half-way through training.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError, ConfigTypeError

BIAS_MODES = ("none", "all", "lora_only")
ADAPTER_DTYPES = ("base", "float32", "bfloat16", "float16", "float64")
INIT_MODES = ("kaiming", "gaussian")
ALL_LINEAR = "all-linear"
MAX_RANK = 2**24
"""No layer is wider; a larger rank could not even be turned into a float scale."""
MAX_ALPHA = 3.4028234663852886e38
"""float32's largest value: the scale alpha / r multiplies float32 (or smaller) tensors."""
_SUFFIX_REGEX = r"(?:.*\.)?(?:{})"  # a rank/alpha key matches a name or a dotted suffix


def _fail(name: str, value: Any, allowed: str, exc: type[Exception] = ValueError) -> None:
    raise (ConfigTypeError if exc is TypeError else ConfigError)(name, value, allowed)


def _finite(value: float) -> bool:
    """``math.isfinite``, but False (not OverflowError) for an int too big for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_regex(name: str, pattern: str, template: str = "{}") -> None:
    # ``template`` is the form the pattern is used in (rank/alpha keys are embedded in a
    # suffix regex, where for example a mid-pattern "(?i)" is an error). re.compile raises
    # OverflowError for huge repeat counts and RecursionError for very deep nesting.
    try:
        re.compile(template.format(pattern))
    except (re.error, OverflowError, RecursionError) as err:
        _fail(name, pattern, f"expected a valid regular expression ({err})")


def _check_names(name: str, value: Any, allow_regex: bool) -> Any:
    """Normalise a target-like field: a regex string, or a list of module names."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            _fail(name, value, "expected a non-empty regex string or a list of module names")
        if allow_regex:
            _check_regex(name, value)
        return value
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        items = list(value)
        if not items:
            _fail(name, value, "expected a non-empty list of module names (or None)")
        for item in items:
            if not isinstance(item, str) or not item:
                _fail(
                    name, value, "expected every entry to be a non-empty module-name string",
                    TypeError,
                )
        return items
    _fail(name, value, "expected a regex string or a list of module names", TypeError)
    return None


def _check_pattern(name: str, value: Any, kind: type, positive: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _fail(name, value, "expected a mapping from a module-name regex to a value", TypeError)
    out = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            _fail(name, value, "expected non-empty regex strings as keys", TypeError)
        _check_regex(name, key, _SUFFIX_REGEX)
        if isinstance(v, bool) or not isinstance(v, kind | int):
            _fail(name, value, f"expected {kind.__name__} values (key {key!r} has {v!r})",
                  TypeError)
        if kind is int and not isinstance(v, int):
            _fail(name, value, f"expected integer ranks (key {key!r} has {v!r})", TypeError)
        if positive and not (v > 0 and (kind is int or _finite(v))):
            _fail(name, value, f"expected finite values > 0 (key {key!r} has {v!r})")
        if kind is float and v > MAX_ALPHA:
            _fail(name, value, f"expected values <= {MAX_ALPHA:.4g}, float32's largest (key "
                  f"{key!r} has {v!r})")
        if kind is int and v > MAX_RANK:
            _fail(name, value, f"expected ranks <= {MAX_RANK:,} (key {key!r} has {v!r})")
        out[key] = kind(v)
    return out


@dataclass
class LoRAConfig:
    """Configuration of a LoRA adaptation.

    Example:
        >>> cfg = LoRAConfig(r=8, alpha=16, target_modules=["query", "value"])
        >>> cfg.scaling_for(r=8, alpha=16)
        2.0
        >>> LoRAConfig(r=0)
        Traceback (most recent call last):
        ...
        lora_lightning.errors.ConfigError: LoRAConfig.r: got 0; expected an integer >= 1.
    """

    r: int = 8
    """Rank of the update B·A. Must be an integer >= 1."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r (or alpha / sqrt(r))."""
    dropout: float = 0.0
    """Dropout applied to the adapter's input only, in [0, 1)."""
    target_modules: str | list[str] = field(default_factory=lambda: ["query", "value"])
    """A list matches a module's exact name or a dotted suffix (``"query"`` matches
    ``encoder.layer.0.attention.self.query``); a string must match the full name as a
    regex; ``"all-linear"`` targets every Linear (and HF Conv1D) except the output head."""
    exclude_modules: str | list[str] | None = None
    """Modules never adapted, with the same matching rules as ``target_modules``."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank: regex -> r. A key matches a name or a dotted suffix of it."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha: regex -> alpha, matched like ``rank_pattern``."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""
    init: str = "kaiming"
    """``"kaiming"``: A kaiming-uniform, B = 0. ``"gaussian"``: A ~ N(0, 1/r), B = 0."""
    bias: str = "none"
    """Which biases train: ``"none"``, ``"all"``, or ``"lora_only"`` (adapted modules)."""
    modules_to_save: list[str] | None = None
    """Modules trained fully (for example a new classifier head); exact name or suffix."""
    use_dora: bool = False
    """DoRA: a trainable magnitude per output with the direction W + ΔW normalised."""
    adapter_dtype: str | None = None
    """The adapters' dtype: ``None`` (default) float32 on a float16/bfloat16 base and the
    base's dtype otherwise (as PEFT's ``autocast_adapter_dtype``: an update below bf16's
    resolution is not lost); ``"base"`` the base weight's dtype; or ``"float32"``,
    ``"bfloat16"``, ``"float16"``, ``"float64"``. Kept when the model is converted
    (``model.to(torch.bfloat16)``, ``precision="bf16-true"``)."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: the ``B`` factors train with this many times the learning rate (2 to 16 in
    the paper). Applied by :func:`~lora_lightning.optim.lora_param_groups`, which an
    optimizer must be built from; ``None``: one learning rate for every tensor."""

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            _fail("r", self.r, "expected an integer >= 1", TypeError)
        if self.r < 1:
            _fail("r", self.r, "expected an integer >= 1")
        if self.r > MAX_RANK:
            _fail("r", self.r, f"expected an integer <= {MAX_RANK:,} (2**24; no layer is wider)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            _fail("alpha", self.alpha, "expected a number > 0", TypeError)
        if not (self.alpha > 0 and _finite(self.alpha)):
            _fail("alpha", self.alpha, "expected a finite number > 0")
        if self.alpha > MAX_ALPHA:
            _fail("alpha", self.alpha,
                  f"expected a number <= {MAX_ALPHA:.4g} (float32's largest; the scale "
                  "alpha / r multiplies float32 tensors)")
        self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            _fail("dropout", self.dropout, "expected a number in [0, 1)", TypeError)
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "expected a number in [0, 1)")
        self.dropout = float(self.dropout)
        if self.target_modules is None:
            _fail("target_modules", None,
                  f"expected a regex, a list of module names or {ALL_LINEAR!r}", TypeError)
        self.target_modules = _check_names("target_modules", self.target_modules, True)
        self.exclude_modules = _check_names("exclude_modules", self.exclude_modules, True)
        self.modules_to_save = _check_names("modules_to_save", self.modules_to_save, False)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.rank_pattern = _check_pattern("rank_pattern", self.rank_pattern, int, True)
        self.alpha_pattern = _check_pattern("alpha_pattern", self.alpha_pattern, float, True)
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                _fail(flag, getattr(self, flag), "expected True or False", TypeError)
        if self.adapter_dtype is not None and self.adapter_dtype not in ADAPTER_DTYPES:
            _fail("adapter_dtype", self.adapter_dtype,
                  f"expected None or one of {list(ADAPTER_DTYPES)}")
        if self.loraplus_lr_ratio is not None:
            ratio = self.loraplus_lr_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, int | float):
                _fail("loraplus_lr_ratio", ratio, "expected a number > 0 or None", TypeError)
            if not (ratio > 0 and _finite(ratio)):
                _fail("loraplus_lr_ratio", ratio,
                      "expected a finite number > 0 (LoRA+ uses 2 to 16), or None")
            self.loraplus_lr_ratio = float(ratio)
        if self.init not in INIT_MODES:
            _fail("init", self.init, f"expected one of {list(INIT_MODES)}")
        if self.bias not in BIAS_MODES:
            _fail("bias", self.bias, f"expected one of {list(BIAS_MODES)}")

    # -- per-module values ---------------------------------------------------------
    def rank_for(self, name: str) -> int:
        """Rank for module ``name``: the first matching ``rank_pattern`` key, else ``r``."""
        return _pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        """Alpha for module ``name``: the first matching ``alpha_pattern`` key, else ``alpha``."""
        return _pattern_value(self.alpha_pattern, name, self.alpha)

    def scaling_for(self, r: int, alpha: float) -> float:
        """The update's scale: alpha / r, or alpha / sqrt(r) with ``use_rslora``."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def scaling_rule(self) -> str:
        return "alpha/sqrt(r)" if self.use_rslora else "alpha/r"

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict; ``LoRAConfig(**d)`` rebuilds the config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoRAConfig:
        """Build from a dict, rejecting unknown keys with the list of valid ones."""
        if not isinstance(data, Mapping):
            err = ConfigTypeError("from_dict", data, "expected a mapping of LoRAConfig fields")
            err.args = (f"LoRAConfig.from_dict: expected a mapping, got {type(data).__name__}.",)
            raise err
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise UnknownFieldError(unknown, sorted(known))
        return cls(**dict(data))


class UnknownFieldError(ConfigError):
    """``LoRAConfig.from_dict`` got keys that are not fields."""

    def __init__(self, unknown: list[str], known: list[str]) -> None:
        self.unknown, self.known = unknown, known
        ValueError.__init__(
            self, f"LoRAConfig: unknown field(s) {unknown}; valid fields are {known}."
        )
        self.field, self.value, self.allowed = unknown[0], unknown, f"one of {known}"


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    for key, value in patterns.items():
        if pattern_key_matches(key, name):
            return value
    return default


def pattern_key_matches(key: str, name: str) -> bool:
    """A ``rank_pattern``/``alpha_pattern`` key matches a name or a dotted suffix of it."""
    return re.fullmatch(_SUFFIX_REGEX.format(key), name) is not None


def entry_matches(entry: str, name: str) -> bool:
    """One list entry matches a module's exact name or a dotted suffix of it."""
    return name == entry or name.endswith("." + entry)


def name_matches(name: str, spec: str | list[str] | None) -> bool:
    """PEFT's rule: a string is a full-name regex; a list matches exact names or suffixes."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(entry_matches(s, name) for s in spec)
