"""Names shared by the layer types and their variants: adapter and parameter names."""

from __future__ import annotations

import re
from functools import lru_cache

ADAPTER_PARAM_NAMES = ("lora_A", "lora_B", "lora_magnitude")
DEFAULT_ADAPTER = "default"
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")
"""Adapter names: letters, digits and underscores (they become parameter-name suffixes)."""


@lru_cache(maxsize=1024)
def param_names(adapter: str) -> tuple[str, str, str]:
    """Attribute names of ``adapter``'s A, B and DoRA magnitude on a layer (cached: every
    forward asks)."""
    if adapter == DEFAULT_ADAPTER:
        return ADAPTER_PARAM_NAMES
    return tuple(f"{n}_{adapter}" for n in ADAPTER_PARAM_NAMES)  # type: ignore[return-value]


def type_name(t: type) -> str:
    """``module.qualname`` of a type, as errors name it."""
    return f"{t.__module__}.{t.__qualname__}"
