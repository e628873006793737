"""Every numeric config key is finite and in its range, checked for every key of the
schema (not a list of examples), plus a property-based test that config loading lets only ConfigError escape."""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddil_core.config import Config, ConfigError, load_config
from ddil_core.config.checks import RANGES, numeric_fields
from tests import ROOT

NUMERIC = list(numeric_fields(Config))


def _kind(key: str):
    """int or float: the element type of a numeric field."""
    cls, tp = Config, None
    for part in key.split("."):
        tp = typing.get_type_hints(cls)[part]
        cls = tp
    while typing.get_origin(tp) in (typing.Union, list):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _is_list(key: str) -> bool:
    cls, tp = Config, None
    for part in key.split("."):
        tp = typing.get_type_hints(cls)[part]
        cls = tp
    if typing.get_origin(tp) is typing.Union:  # Optional[list[...]]
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) is list


def test_every_numeric_key_has_a_range_and_every_range_a_key():
    assert NUMERIC, "no numeric fields found"
    assert sorted(set(NUMERIC) - set(RANGES)) == [], "numeric keys without a range in config_ranges.RANGES"
    assert sorted(set(RANGES) - set(NUMERIC)) == [], "ranges of keys the schema does not have"


FLOAT_KEYS = [k for k in NUMERIC if _kind(k) is float]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_non_finite_values(key, value):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [f"{key}={value}"])
    assert key in str(info.value) and "not a finite number" in str(info.value)


def _outside(rng) -> list:
    """Values just outside a range (below, above, or the excluded bound)."""
    values = []
    if rng.low is not None:
        values.append(rng.low if rng.low_open else rng.low - 1)
    if rng.high is not None:
        values.append(rng.high if rng.high_open else rng.high + 1)
    return values


OUTSIDE = [(key, v) for key in NUMERIC for v in _outside(RANGES[key])]


@pytest.mark.parametrize("key,value", OUTSIDE, ids=[f"{k}={v}" for k, v in OUTSIDE])
def test_every_key_refuses_a_value_just_outside_its_range(key, value):
    if _kind(key) is int:
        value = int(value)
    text = f"[{value}]" if _is_list(key) else str(value)
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [f"{key}={text}"])
    assert key in str(info.value) and f"must be {RANGES[key].describe()}" in str(info.value), str(info.value)


def test_ints_beyond_64_bits_are_refused():
    with pytest.raises(ConfigError, match="training.steps = 1000000000000000000000000 does not fit in 64 bits"):
        load_config("tiny", ["training.steps=1000000000000000000000000"])


def test_the_shipped_recipes_are_valid():
    for recipe in sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "params.yaml"]:
        load_config(str(recipe))


@pytest.mark.parametrize("override,message", [
    ("objective.lcm.w_min=20", "objective.lcm.w_min = 20.0 must not exceed objective.lcm.w_max = 16.0"),
    ("objective.dmd2.min_step=990", "objective.dmd2.min_step = 990 must not exceed objective.dmd2.max_step = 980"),
    ("model.dtype=bfloat16", "model.dtype = bfloat16 needs training.mixed_precision = bf16"),
])
def test_relations_between_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_lcm_student_steps_beyond_its_solver_grid():
    with pytest.raises(ConfigError, match="objective.student_steps = 60 must be at most objective.lcm.num_ddim_ti"):
        load_config("tiny", ["objective.name=lcm", "objective.student_steps=60"])


def test_dmd2_timesteps_must_decrease():
    with pytest.raises(ConfigError, match=r"objective.dmd2.timesteps = \[249, 999\] must be strictly decreasing"):
        load_config("tiny", ["objective.name=dmd2", "objective.student_steps=2", "objective.dmd2.timesteps=[249,999]"])


# ------------------------------------------------------------------------------------------- property-based

def _leaves(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


KEYS = list(_leaves(Config))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["off", "on", "pd", "lcm", "dmd2", "nan", "1e-4", "-1", "fifo", "static"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=5), inner, max_size=2)),
                      max_leaves=5)
KEY = st.one_of(st.sampled_from(KEYS), st.text(alphabet="abcdefghijklmnopqrstuvwxyz._", min_size=1, max_size=20))


def _nest(key: str, value):
    node = value
    for part in reversed(key.split(".")):
        node = {part: node}
    return node


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KEY, VALUES), min_size=1, max_size=4))
def test_config_validation_lets_only_config_error_escape(pairs):
    """Random keys (real and made up) with random values of every kind: loading either succeeds with every float
    finite and every number in its range, or raises ConfigError; nothing else escapes."""
    from ddil_core.config import _merge, config_from_dict
    from ddil_core.config.checks import number_problems

    data: dict = {}
    for key, value in pairs:
        data = _merge(data, _nest(key, value))
    try:
        config = config_from_dict(data)
    except ConfigError:
        return
    assert number_problems(config) == []
    for key in NUMERIC:
        node = config
        for part in key.split("."):
            node = getattr(node, part)
        for v in node if isinstance(node, list) else [node]:
            assert not (isinstance(v, float) and not math.isfinite(v)), (key, v)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(KEYS), st.text(max_size=12))
def test_any_override_text_is_a_value_or_a_config_error(key, raw):
    """`--set key=<anything>`: YAML that does not parse, or values of the wrong kind, are ConfigError."""
    try:
        load_config("tiny", [f"{key}={raw}"])
    except ConfigError:
        pass
