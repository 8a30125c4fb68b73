"""``LoRAConfig``: what to adapt and how, validated when it is built.

Every invalid value raises ``ValueError`` (or ``TypeError`` for a wrong type) naming the
field, the value received and what is allowed, so a bad config fails at construction and
never half-way through training.

Regexes come from files too (``adapter_config.json``, a checkpoint's metadata), so their
matching is bounded: a pattern is at most :data:`MAX_PATTERN_CHARS` long; it is matched by
RE2 (linear time, from the ``google-re2`` package) when RE2 accepts it; otherwise (a
lookaround, a backreference, or RE2 not installed) by Python's ``re`` with a time limit of
:data:`MATCH_SECONDS` per module name, enforced in the main thread (a timer signal;
another thread has no such limit). Past either bound, a :class:`PatternError` names the
field and the pattern.
"""

from __future__ import annotations

import functools
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError, ConfigTypeError, PatternError

try:  # google-re2: linear-time matching, whatever the pattern
    import re2 as _re2
except ImportError:  # pragma: no cover - a declared dependency; Python's re with a timer
    _re2 = None

BIAS_MODES = ("none", "all", "lora_only")
ADAPTER_DTYPES = ("base", "float32", "bfloat16", "float16", "float64")
INIT_MODES = ("kaiming", "gaussian", "gradient")
QUANTIZE_KINDS = ("nf4", "fp4", "int8")
"""bitsandbytes' kinds of frozen base: 4-bit NormalFloat, 4-bit float, 8-bit (LLM.int8())."""
ALL_LINEAR = "all-linear"
MAX_RANK = 2**24
"""No layer is wider; a larger rank could not even be turned into a float scale."""
MAX_ALPHA = 3.4028234663852886e38
"""float32's largest value: the scale alpha / r multiplies float32 (or smaller) tensors."""
_SUFFIX_REGEX = r"(?:.*\.)?(?:{})"  # a rank/alpha key matches a name or a dotted suffix
MAX_PATTERN_CHARS = 100_000
"""The longest regex accepted (``save_adapter`` writes one alternation of every adapted
module's escaped name, so a large model's is a few tens of kB)."""
MATCH_SECONDS = 0.25
"""How long Python's ``re`` may take to match one module name (patterns RE2 refuses)."""


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
    # suffix regex, where for example a mid-pattern "(?i)" is an error).
    compile_pattern(name, pattern, template)


class _Timeout(Exception):
    pass


def _raise_timeout(signum, frame) -> None:
    raise _Timeout


def _timed(field_name: str, pattern: str, match: Callable[[str], Any]) -> Callable[[str], bool]:
    """``match`` under a :data:`MATCH_SECONDS` timer (main thread, where signals exist)."""
    def fullmatch(name: str) -> bool:
        if (threading.current_thread() is not threading.main_thread()
                or not hasattr(signal, "setitimer")):
            return match(name) is not None
        previous = signal.signal(signal.SIGALRM, _raise_timeout)
        start = time.monotonic()
        old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, MATCH_SECONDS)
        try:
            return match(name) is not None
        except _Timeout:
            raise PatternError(field_name, pattern, (
                f"matching it against module name {name!r} took longer than "
                f"{MATCH_SECONDS} s (catastrophic backtracking); write it without nested or "
                "overlapping repeats, such as (a|a)* or (.*)*")) from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if old_delay:  # someone else's timer: give back what is left of it
                left = max(old_delay - (time.monotonic() - start), 1e-3)
                signal.setitimer(signal.ITIMER_REAL, left, old_interval)
    return fullmatch


@functools.lru_cache(maxsize=4096)
def compile_pattern(field_name: str, pattern: str, template: str = "{}"
                    ) -> Callable[[str], bool]:
    """A full-match function for ``template.format(pattern)``, bounded in time (see the
    module docstring). Raises :class:`ConfigError` for an invalid regex and
    :class:`PatternError` for one over :data:`MAX_PATTERN_CHARS`; the function raises
    :class:`PatternError` when a match runs past :data:`MATCH_SECONDS`."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(field_name, pattern[:60] + "...", (
            f"a regex of {len(pattern):,} characters, above the {MAX_PATTERN_CHARS:,} allowed"))
    full = template.format(pattern)
    # re.compile raises OverflowError for huge repeat counts and RecursionError for very
    # deep nesting. Python's syntax is the reference: RE2 only runs what both accept.
    try:
        compiled = re.compile(full)
    except (re.error, OverflowError, RecursionError) as err:
        _fail(field_name, pattern, f"expected a valid regular expression ({err})")
    if _re2 is not None and "{," not in full:  # RE2 reads "{,n}" as literal text
        options = _re2.Options()
        options.log_errors = False
        try:
            fast = _re2.compile(full, options=options)
        except _re2.error:
            pass  # a lookaround or backreference: Python's re, with the timer
        else:
            return lambda name: fast.fullmatch(name) is not None
    return _timed(field_name, pattern, compiled.fullmatch)


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
    """``"kaiming"``: A kaiming-uniform, B = 0. ``"gaussian"``: A ~ N(0, 1/r), B = 0.
    ``"gradient"``: A kaiming-uniform at injection, then, on the first training step
    (``LoRACallback``, or :class:`~lora_lightning.gradient_init.GradientInit` in plain
    PyTorch), the top-r right singular vectors of the layer's weight gradient, B = 0
    (Linear, HF Conv1D and Conv layers with a dense base; others keep the A they were
    injected with). Saved PEFT files say ``init_lora_weights: true``: the init only decides
    how training starts."""
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

    quantize_base: str | None = None
    """QLoRA: at injection, store the frozen weight of every adapted ``nn.Linear`` in
    bitsandbytes' ``"nf4"`` (4-bit NormalFloat, double quantization), ``"fp4"`` or
    ``"int8"`` (``pip install 'lora-lightning[qlora]'``); the base computes in its own dtype,
    adapters stay float32. ``None`` (default): the base stays as it is."""

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
        if self.quantize_base is not None and self.quantize_base not in QUANTIZE_KINDS:
            _fail("quantize_base", self.quantize_base,
                  f"expected None or one of {list(QUANTIZE_KINDS)} (bitsandbytes' 4-bit "
                  "NormalFloat, 4-bit float, 8-bit)")
        if self.init not in INIT_MODES:
            _fail("init", self.init, f"expected one of {list(INIT_MODES)}")
        if self.init == "gradient" and (self.use_dora or self.quantize_base):
            why = ("use_dora=True (DoRA normalises the weight, so its gradient is not B's)"
                   if self.use_dora else f"quantize_base={self.quantize_base!r} (a quantized "
                   "weight has no gradient to read)")
            _fail("init", self.init, f"the gradient init cannot be combined with {why}; use "
                  "init='kaiming' with it, or drop it to keep init='gradient'")
        if self.bias not in BIAS_MODES:
            _fail("bias", self.bias, f"expected one of {list(BIAS_MODES)}")

    # -- per-module values ---------------------------------------------------------
    def rank_for(self, name: str) -> int:
        """Rank for module ``name``: the first matching ``rank_pattern`` key, else ``r``."""
        return _pattern_value(self.rank_pattern, name, self.r, "rank_pattern")

    def alpha_for(self, name: str) -> float:
        """Alpha for module ``name``: the first matching ``alpha_pattern`` key, else ``alpha``."""
        return _pattern_value(self.alpha_pattern, name, self.alpha, "alpha_pattern")

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


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any,
                   field_name: str) -> Any:
    for key, value in patterns.items():
        if pattern_key_matches(key, name, field_name):
            return value
    return default


def pattern_key_matches(key: str, name: str, field_name: str = "rank_pattern") -> bool:
    """A ``rank_pattern``/``alpha_pattern`` key matches a name or a dotted suffix of it."""
    return compile_pattern(field_name, key, _SUFFIX_REGEX)(name)


def entry_matches(entry: str, name: str) -> bool:
    """One list entry matches a module's exact name or a dotted suffix of it."""
    return name == entry or name.endswith("." + entry)


def name_matches(name: str, spec: str | list[str] | None,
                 field_name: str = "target_modules") -> bool:
    """PEFT's rule: a string is a full-name regex; a list matches exact names or suffixes."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return compile_pattern(field_name, spec)(name)
    return any(entry_matches(s, name) for s in spec)
