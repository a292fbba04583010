"""One config object for YAML, CLI and Python: nested dataclasses, filled strictly from dicts.

    cfg = load_config(TrainConfig, "configs/demo.yaml", ["optim.lr=1e-3", "max_steps=200"])

Unknown keys, values of the wrong type and values out of range raise ConfigError naming the dotted key.
Dataclasses check their ranges in __post_init__ with `check_range`; `from_dict` adds the section to the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from phiforge.errors import ConfigError
from phiforge.fileio import read_user_text

T = TypeVar("T")
INT64 = 2**63


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
        rule = f"greater than {_number(lo)}" if lo_open else f"at least {_number(lo)}"
    elif lo is None:
        rule = f"less than {_number(hi)}" if hi_open else f"at most {_number(hi)}"
    else:
        rule = f"in {'(' if lo_open else '['}{_number(lo)}, {_number(hi)}{')' if hi_open else ']'}"
    raise BadValue(key, f"must be {rule}{note}, got {value!r}")


def check_seed(key: str, value: int | None) -> None:
    """A seed (None: unseeded) for torch, numpy and random alike: an integer from 0 to 2**63 - 1."""
    if value is not None:
        check_range(key, value, 0, INT64 - 1)


def _number(x: float) -> str:
    """A bound as written: integers in full (1048576, not 1.04858e+06), floats shortest (0.001, 1e-05)."""
    return str(x) if isinstance(x, int) else f"{x:g}"


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
                errors.append((_shape_fits(value, arg), e))
        if not errors:
            raise BadValue(key, f"has a bad value: {value!r}")
        # the error of the alternative the value was written as (a mapping's, for a mapping), else the first
        raise next((e for fits, e in errors if fits), errors[0][1])
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
        return _coerce_int(value, key)
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


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadValue(key, f"must be an integer, got {value!r}")
    if not -INT64 <= value < INT64:  # torch and numpy take 64-bit integers: larger ones crash deep inside them
        raise BadValue(key, f"must fit in 64 bits (-2**63 to 2**63 - 1), got {value!r}")
    return value


def _shape_fits(value: Any, tp: Any) -> bool:
    """Whether `value` has the shape of type `tp` (a mapping for a dataclass or dict, a list for a list)."""
    origin = typing.get_origin(tp) or tp
    if dataclasses.is_dataclass(tp) or origin is dict:
        return isinstance(value, dict)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return not isinstance(value, (dict, list, tuple))


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


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping that gives one key twice."""


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, where PyYAML silently keeps the last one.
    Merge keys (`<<: *base`) still override what they merge, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)):  # SafeLoader judges other keys itself
                    continue
                line = key_node.start_mark.line + 1
                if key in first_line:
                    where = f" (lines {first_line[key]} and {line})" if first_line[key] != line else ""
                    raise DuplicateKeyError(None, None, f"duplicate key {key!r}{where}", key_node.start_mark)
                first_line[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    """The one YAML reader for what users write (config files, --set values, flags): safe (no tags that build
    objects) and strict (a duplicate key is an error, not the last one silently)."""
    return yaml.load(text, Loader=StrictLoader)


def yaml_value(raw: str, what: str):
    """A command-line value read as YAML (numbers, true/false, lists, mappings); text that is not YAML stays
    text. A mapping with a duplicate key is a ConfigError naming `what`."""
    try:
        return load_yaml(raw) if raw != "" else ""
    except DuplicateKeyError as e:
        raise ConfigError(f"{what}: {e.problem}") from None
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict, sets: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict, in place."""
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        value = yaml_value(raw, f"--set {item}")
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


def read_user_mapping(path: str | Path, error: type[Exception], what: str, missing: str | None = None) -> dict:
    """A YAML (or, by its .json suffix, JSON) file a user named that must hold a mapping ({} when empty); every
    problem is `error` naming WHAT and PATH (see read_user_text)."""
    text = read_user_text(path, error, what, missing)
    is_json = Path(path).suffix == ".json"
    try:
        data = json.loads(text) if is_json else load_yaml(text)
    except (ValueError, yaml.YAMLError) as e:
        raise error(f"{what} {path} is not valid {'JSON' if is_json else 'YAML'}: {str(e).splitlines()[0]}") \
            from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping at the top level")
    return data


def read_yaml(path: str | Path) -> dict:
    return read_user_mapping(path, ConfigError, "config file")


def load_config(cls: type[T], path: str | Path | None = None, sets: list[str] | None = None) -> T:
    data = read_yaml(path) if path else {}
    apply_overrides(data, sets or [])
    return from_dict(cls, data)
