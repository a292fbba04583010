"""One config object for YAML, CLI and Python: nested dataclasses, filled strictly from dicts.

    cfg = load_config(TrainConfig, "configs/demo.yaml", ["optim.lr=1e-3", "max_steps=200"])

Unknown keys, values of the wrong type and values out of range raise ConfigError naming the dotted key.
Dataclasses check their ranges in __post_init__ with `check_range`; `from_dict` adds the section to the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from phiforge.errors import ConfigError

T = TypeVar("T")


class BadValue(ConfigError):
    """A config value of the wrong type or out of range: `'key' problem`. `key` is the dotted key so far."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"'{key}' {problem}")


def check_range(key: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False, note: str = "") -> None:
    """Raise BadValue unless lo <= value <= hi (< with lo_open / hi_open). NaN and infinities never pass."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadValue(key, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise BadValue(key, f"must be a finite number, got {value!r}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if not (below or above):
        return
    if hi is None:
        rule = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
    elif lo is None:
        rule = f"less than {hi:g}" if hi_open else f"at most {hi:g}"
    else:
        rule = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    raise BadValue(key, f"must be {rule}{note}, got {value!r}")


def check_fields(obj) -> None:
    """Coerce each field of dataclass `obj` to its annotated type in place (for objects built in Python)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.init:
            setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], f.name))


def normalized(cls: type, data: dict, prefix: str = "") -> dict:
    """`data` (a section for dataclass `cls`) with each value coerced to its field's type, keeping only the keys
    given: how a section such as `model:` (preset + overrides) is stored and printed after it was validated."""
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in data.items():
        tp = hints.get(k, Any)
        inner = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        if inner and isinstance(v, dict):
            out[k] = normalized(inner[0], v, f"{prefix}{k}.")
        else:
            v = _coerce(v, tp, prefix + k)
            out[k] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else BadValue(key, f"has a bad value: {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise BadValue(key, f"must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise BadValue(key, f"must be a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise BadValue(key, f"must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise BadValue(key, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise BadValue(key, f"must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise BadValue(key, f"must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise BadValue(key, f"must be a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrongly typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"config{' ' + prefix.rstrip('.') if prefix else ''} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'"
                          + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                          + f"; valid keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except BadValue as e:  # from cls.__post_init__, which knows its field names but not its section
        if not prefix:
            raise
        raise BadValue(prefix + e.key, e.problem) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad config{' ' + prefix.rstrip('.') if prefix else ''}: {e}") from None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict, sets: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict, in place."""
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set '{key}': '{p}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    from phiforge.fileio import read_user_mapping

    return read_user_mapping(path, ConfigError, "config file")


def load_config(cls: type[T], path: str | Path | None = None, sets: list[str] | None = None) -> T:
    data = read_yaml(path) if path else {}
    apply_overrides(data, sets or [])
    return from_dict(cls, data)
