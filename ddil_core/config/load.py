"""Building a Config from a YAML recipe and `--set a.b=c` overrides, strictly: unknown keys are rejected with the
nearest valid key named, every value is coerced to its key's type, and every error names the recipe file or the
override it comes from."""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ddil_core.config.checks import config_problems, validate
from ddil_core.config.limits import MAX_OVERRIDE_CHARS, MAX_RECIPE_BYTES, LimitExceeded, check_size, check_yaml
from ddil_core.config.schema import Config, ConfigError


def _nearest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads off/no/on/yes as booleans
            value = next((a for a in args if a in (("on", "yes") if value else ("off", "no"))), value)
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an integer literal beyond any float
            raise ConfigError(f"{where}: {value} is not a finite number") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_nearest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> dict:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}}; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    try:
        check_size(len(item), MAX_OVERRIDE_CHARS, f"--set {key.strip()[:80]}", "characters")
        check_yaml(raw, f"--set {key.strip()[:80]}", MAX_OVERRIDE_CHARS)
    except LimitExceeded as exc:
        raise ConfigError(str(exc)) from None
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({yaml_error_line(exc)})") from None
    node: dict = {}
    cursor = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node


def yaml_error_line(exc: Exception) -> str:
    """A YAML parse error in one line: where it is and what is wrong (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(getattr(exc, "problem", None) or exc).split())
    context = getattr(exc, "context", None)
    return where + what + (f" ({' '.join(str(context).split())})" if context else "")


def recipe_path(name_or_path: str) -> Path:
    """A recipe is a YAML path, or a name looked up in ./configs and in the project's configs/ folder."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not path.exists():
            raise ConfigError(f"config file not found: {name_or_path}")
        return path
    for root in (Path.cwd() / "configs", Path(__file__).resolve().parents[2] / "configs"):
        candidate = root / f"{name_or_path}.yaml"
        if candidate.exists():
            return candidate
    raise ConfigError(f"no recipe named '{name_or_path}' (looked for configs/{name_or_path}.yaml)")


def _read_recipe(recipe: Optional[str]) -> tuple[dict, str]:
    """The recipe's plain data and its name for messages (its path; "defaults" without a recipe)."""
    if not recipe:
        return {}, "defaults"
    path = recipe_path(recipe)
    try:
        check_size(path.stat().st_size, MAX_RECIPE_BYTES, str(path))  # before reading it
        text = path.read_text(encoding="utf-8")
        check_yaml(text, str(path))
        loaded = yaml.safe_load(text)
    except LimitExceeded as exc:
        raise ConfigError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({yaml_error_line(exc)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML recipe (not valid UTF-8 text)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable recipe ({exc.strerror or exc})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(loaded).__name__}")
    return loaded or {}, str(path)


def _names(item: str, problem: str) -> bool:
    """Whether a problem line names the key of override `item` (or a section of it: ddil.priors for
    ddil.priors.forward, whose rule is 'ddil.priors must sum to 1')."""
    parts = item.split("=", 1)[0].strip().split(".")
    return any(".".join(parts[:n]) in problem for n in range(len(parts), 1, -1))


def load_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a recipe (path or name; None: the defaults), apply `a.b=c` overrides, validate.

    Every error names where it comes from: the recipe file for its own keys and values, `--set KEY=VALUE` for an
    override (an unknown key, a wrong type, a value out of range), both when the two only disagree together."""
    data, source = _read_recipe(recipe)
    try:
        _build(Config, data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    overrides = list(overrides or [])
    for item in overrides:
        data = _merge(data, parse_override(item))
        try:
            _build(Config, data)
        except ConfigError as exc:
            raise ConfigError(f"--set {item}: {exc}") from None
    config = _build(Config, data)
    problems = config_problems(config)
    if not problems:
        return config
    if not overrides:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    without = set(config_problems(_build(Config, _read_recipe(recipe)[0])))
    parts = []
    for problem in problems:
        named = [item for item in overrides if _names(item, problem)]
        if problem in without and not named:
            parts.append(f"{source}: {problem}")
        elif named:
            parts.append(f"--set {named[-1]}: {problem}")
        else:  # a rule between keys that only the overrides break
            parts.append(f"{source} with --set {', '.join(overrides)}: {problem}")
    raise ConfigError("; ".join(parts))


def config_from_dict(data: dict) -> Config:
    config = _build(Config, data)
    validate(config, "config")
    return config
