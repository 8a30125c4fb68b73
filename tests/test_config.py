"""Tests for ``LoRAConfig``: validation, per-module rank/alpha, scaling, dict round trip."""

from __future__ import annotations

import math
import re
from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lightning import LoRAConfig
from lora_lightning.errors import ConfigError

FIELD_NAMES = [f.name for f in fields(LoRAConfig)]


def test_defaults_are_valid():
    cfg = LoRAConfig()
    assert (cfg.r, cfg.alpha, cfg.dropout) == (8, 16.0, 0.0)
    assert cfg.target_modules == ["query", "value"]
    assert cfg.exclude_modules is None and cfg.modules_to_save is None
    assert cfg.rank_pattern == {} and cfg.alpha_pattern == {}
    assert (cfg.init, cfg.bias, cfg.use_rslora, cfg.use_dora) == ("kaiming", "none", False, False)
    assert isinstance(cfg.alpha, float) and isinstance(cfg.dropout, float)


def test_values_are_normalised():
    cfg = LoRAConfig(alpha=4, dropout=0, target_modules=("a", "b"), modules_to_save="head",
                     alpha_pattern={"a": 3})
    assert cfg.alpha == 4.0 and type(cfg.alpha) is float
    assert cfg.dropout == 0.0 and type(cfg.dropout) is float
    assert cfg.target_modules == ["a", "b"]
    assert cfg.modules_to_save == ["head"]
    assert cfg.alpha_pattern == {"a": 3.0} and type(cfg.alpha_pattern["a"]) is float


INVALID = [
    # (field, value, exception)
    ("r", 0, ValueError),
    ("r", -3, ValueError),
    ("r", 2.5, TypeError),
    ("r", "8", TypeError),
    ("r", True, TypeError),
    ("r", None, TypeError),
    ("alpha", 0, ValueError),
    ("alpha", -1.0, ValueError),
    ("alpha", math.nan, ValueError),
    ("alpha", math.inf, ValueError),
    ("alpha", -math.inf, ValueError),
    ("alpha", 10**400, ValueError),
    ("alpha", "16", TypeError),
    ("alpha", True, TypeError),
    ("dropout", -0.1, ValueError),
    ("dropout", 1.0, ValueError),
    ("dropout", 1, ValueError),
    ("dropout", math.nan, ValueError),
    ("dropout", "0.1", TypeError),
    ("dropout", False, TypeError),
    ("bias", "some", ValueError),
    ("bias", None, ValueError),
    ("init", "xavier", ValueError),
    ("init", "", ValueError),
    ("use_rslora", 1, TypeError),
    ("use_dora", "yes", TypeError),
    ("target_modules", "(", ValueError),
    ("target_modules", "a{99999999999}", ValueError),
    ("target_modules", "", ValueError),
    ("target_modules", [], ValueError),
    ("target_modules", None, TypeError),
    ("target_modules", ["q", 3], TypeError),
    ("target_modules", ["q", ""], TypeError),
    ("target_modules", 5, TypeError),
    ("exclude_modules", "[a-", ValueError),
    ("exclude_modules", [], ValueError),
    ("modules_to_save", [], ValueError),
    ("modules_to_save", [None], TypeError),
    ("rank_pattern", {"(": 4}, ValueError),
    ("rank_pattern", {"(?i)q": 4}, ValueError),  # flags are invalid inside the suffix regex
    ("rank_pattern", {"q": 0}, ValueError),
    ("rank_pattern", {"q": -2}, ValueError),
    ("rank_pattern", {"q": 2.0}, TypeError),
    ("rank_pattern", {"q": True}, TypeError),
    ("rank_pattern", {"": 2}, TypeError),
    ("rank_pattern", ["q"], TypeError),
    ("alpha_pattern", {"q)": 4.0}, ValueError),
    ("alpha_pattern", {"q": 0.0}, ValueError),
    ("alpha_pattern", {"q": -1}, ValueError),
    ("alpha_pattern", {"q": math.nan}, ValueError),
    ("alpha_pattern", {"q": math.inf}, ValueError),
    ("alpha_pattern", {"q": 10**400}, ValueError),
    ("alpha_pattern", {"q": "4"}, TypeError),
]


@pytest.mark.parametrize(
    ("name", "value", "exc"), INVALID, ids=[f"{n}={v!r}"[:40] for n, v, _ in INVALID]
)
def test_invalid_value_names_field_and_value(name, value, exc):
    with pytest.raises(exc, match=rf"^LoRAConfig\.{name}: got ") as info:
        LoRAConfig(**{name: value})
    # A ConfigError carrying the field; a TypeError exactly when the type is wrong.
    assert isinstance(info.value, ConfigError) and info.value.field == name
    assert isinstance(info.value, TypeError) == (exc is TypeError)
    shown = repr(value)
    if isinstance(value, dict):  # the message shows the mapping or the offending key
        shown = repr(next(iter(value)))
    assert shown in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("bias", "some", "['none', 'all', 'lora_only']"),
        ("init", "xavier", "['kaiming', 'gaussian', 'gradient']"),
    ],
)
def test_choice_errors_list_the_valid_choices(name, value, allowed):
    with pytest.raises(ValueError, match=re.escape(allowed)):
        LoRAConfig(**{name: value})


@pytest.mark.parametrize(
    ("patterns", "name", "expected"),
    [
        ({"lin": 4}, "lin", 4),
        ({"lin": 4}, "block.lin", 4),  # a dotted suffix matches
        ({"lin": 4}, "a.b.lin", 4),
        ({"lin": 4}, "alin", 8),  # not a substring match
        ({"lin": 4}, "lin2", 8),
        ({"lin": 4}, "lin.sub", 8),
        ({r"layers\.[0-2]\.q": 3}, "model.layers.1.q", 3),  # regex against the suffix
        ({r"layers\.[0-2]\.q": 3}, "model.layers.3.q", 8),
        ({"q|v": 2}, "attn.v", 2),  # alternation stays inside the key's group
        ({"q|v": 2}, "attn.k", 8),
        ({"^lin": 5}, "lin", 5),  # "^" anchors the key at the start of the full name
        ({"^lin": 5}, "block.lin", 8),
        ({"q": 2, r".*\.q": 6}, "a.q", 2),  # the first matching key wins
        ({r".*\.q": 6, "q": 2}, "a.q", 6),
        ({}, "anything", 8),
    ],
)
def test_rank_for_and_alpha_for(patterns, name, expected):
    cfg = LoRAConfig(r=8, alpha=8.0, rank_pattern=patterns, alpha_pattern=patterns)
    assert cfg.rank_for(name) == expected
    assert cfg.alpha_for(name) == float(expected)
    assert type(cfg.rank_for(name)) is int and type(cfg.alpha_for(name)) is float


@pytest.mark.parametrize(
    ("r", "alpha", "rslora", "expected"),
    [
        (8, 16.0, False, 2.0),
        (4, 8.0, True, 4.0),  # 8 / sqrt(4)
        (16, 16.0, True, 4.0),
        (3, 1.0, False, 1 / 3),
        (2, 3.0, True, 3 / math.sqrt(2)),
        (1, 5.0, True, 5.0),
    ],
)
def test_scaling_for(r, alpha, rslora, expected):
    cfg = LoRAConfig(use_rslora=rslora)
    assert cfg.scaling_for(r=r, alpha=alpha) == pytest.approx(expected, rel=1e-12)
    assert cfg.scaling_rule == ("alpha/sqrt(r)" if rslora else "alpha/r")


def test_to_dict_from_dict_round_trip():
    cfg = LoRAConfig(
        r=4, alpha=7.5, dropout=0.25, target_modules=r"layers\.\d+\.(q|v)",
        exclude_modules=["layers.0.q"], rank_pattern={"v": 2}, alpha_pattern={"q": 3.0},
        use_rslora=True, init="gaussian", bias="lora_only", modules_to_save=["head"],
        use_dora=True,
    )
    data = cfg.to_dict()
    assert set(data) == set(FIELD_NAMES)
    assert data["rank_pattern"] == {"v": 2} and data["alpha"] == 7.5
    again = LoRAConfig.from_dict(data)
    assert again == cfg
    assert again is not cfg and again.to_dict() == data
    data["rank_pattern"]["v"] = 3  # to_dict returns copies, not the config's own objects
    assert cfg.rank_pattern == {"v": 2}


def test_from_dict_rejects_unknown_keys_and_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['lora_r', 'zzz'\]") as info:
        LoRAConfig.from_dict({"r": 4, "lora_r": 4, "zzz": 1})
    assert "'target_modules'" in str(info.value) and "valid fields" in str(info.value)


def test_from_dict_validates_values_and_type():
    with pytest.raises(ValueError, match=r"LoRAConfig\.r: got 0"):
        LoRAConfig.from_dict({"r": 0})
    with pytest.raises(TypeError, match="expected a mapping, got list"):
        LoRAConfig.from_dict([("r", 4)])


# -- property: any value builds a valid config or fails with a field-named error --------
_names = st.text(alphabet="abq.0123_", min_size=1, max_size=6)
_regexish = st.text(alphabet="ab.*+?()[]{}|^$\\0123,-:<>=!", max_size=8)
_numbers = st.one_of(
    st.integers(min_value=-5, max_value=70),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([10**400, -(10**400), 0.5, 1e-300, 1e300]),
)
_anything = st.one_of(
    st.none(), st.booleans(), _numbers, st.text(max_size=6), _regexish,
    st.sampled_from(["none", "all", "lora_only", "kaiming", "gaussian", "gradient", "all-linear"]),
    st.lists(st.one_of(_names, st.text(max_size=3), st.integers()), max_size=3),
    st.tuples(_names),
    st.dictionaries(st.one_of(_regexish, _names, st.integers()), _numbers, max_size=3),
    st.binary(max_size=3),
    st.sets(_names, max_size=2),
)


def _check_built(cfg: LoRAConfig) -> None:
    """Invariants every successfully built config satisfies."""
    assert type(cfg.r) is int and cfg.r >= 1
    assert type(cfg.alpha) is float and math.isfinite(cfg.alpha) and cfg.alpha > 0
    assert type(cfg.dropout) is float and 0.0 <= cfg.dropout < 1.0
    assert cfg.init in ("kaiming", "gaussian", "gradient") and cfg.bias in ("none", "all", "lora_only")
    assert type(cfg.use_rslora) is bool and type(cfg.use_dora) is bool
    assert all(type(v) is int and v >= 1 for v in cfg.rank_pattern.values())
    assert all(type(v) is float and math.isfinite(v) and v > 0 for v in cfg.alpha_pattern.values())
    for name in ("target_modules", "exclude_modules", "modules_to_save"):
        value = getattr(cfg, name)
        assert value is None or isinstance(value, str | list)
    # Every regex the config will use compiles, and per-module lookups never raise.
    cfg.rank_for("x.y")
    cfg.alpha_for("x.y")
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(FIELD_NAMES), value=_anything)
def test_property_one_field(name, value):
    try:
        cfg = LoRAConfig(**{name: value})
    except (ValueError, TypeError) as err:
        assert f"LoRAConfig.{name}" in str(err)
        return
    _check_built(cfg)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_property_many_fields(data):
    chosen = data.draw(st.lists(st.sampled_from(FIELD_NAMES), unique=True, min_size=1))
    kwargs = {name: data.draw(_anything, label=name) for name in chosen}
    try:
        cfg = LoRAConfig(**kwargs)
    except (ValueError, TypeError) as err:
        named = [n for n in chosen if f"LoRAConfig.{n}:" in str(err)]
        assert len(named) == 1, str(err)
        # The named field really is invalid on its own.
        with pytest.raises((ValueError, TypeError), match=rf"LoRAConfig\.{named[0]}:"):
            LoRAConfig(**{named[0]: kwargs[named[0]]})
        return
    _check_built(cfg)


def test_a_rank_too_large_for_any_layer_is_refused_naming_the_field():
    """Found by hypothesis in CI: r = 10**300 reached ``alpha / r`` and raised OverflowError."""
    from lora_lightning.config import MAX_RANK

    with pytest.raises(ValueError, match=r"LoRAConfig\.r: got 1000.*expected an integer <="):
        LoRAConfig(r=10**300)
    with pytest.raises(ValueError, match=r"LoRAConfig\.rank_pattern: .*ranks <="):
        LoRAConfig(rank_pattern={"x": MAX_RANK + 1})
    assert LoRAConfig(r=MAX_RANK).r == MAX_RANK


@pytest.mark.parametrize(("field", "value"), [("alpha", 2.72e39), ("alpha", 1e308),
                                              ("alpha_pattern", {"fc": 1e39})])
def test_an_alpha_beyond_float32_is_refused_at_construction(field, value):
    """Found by hypothesis: alpha=2.72e39 passed and every forward then failed converting the
    scale to float32."""
    with pytest.raises(ConfigError, match=rf"LoRAConfig\.{field}: .*float32's largest"):
        LoRAConfig(**{field: value})
