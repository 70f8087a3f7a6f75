"""Typed dataclass trees from plain dicts: the one place that checks keys and types.

`build(cls, data, path)` turns the YAML dict into a dataclass instance, failing with a
ConfigError that names the full dotted key for unknown keys (with a close-match
suggestion), wrong types and, through each dataclass's optional `validate(path)`, out-of-range
values and impossible combinations.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from models.registry import ConfigError, suggest

_MISSING = dataclasses.MISSING


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def type_name(tp: Any) -> str:
    """An annotation as users write the value: `int | null`, `'cosine' | 'wsd'`, `list[str]`
    (error messages and the key reference, train/keys.py)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def optional_section(tp: Any) -> type | None:
    """The dataclass of a `Section | None` annotation (an optional config section, e.g.
    `model.norm.removal`), else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1 and dataclasses.is_dataclass(members[0]):
            return members[0]
    return None


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against annotation `tp`, converting dicts into dataclasses."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed if a == value):
            hint = suggest(str(value), [str(a) for a in allowed])
            raise ConfigError(path, f"got {value!r}{hint}; allowed: {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(e)
        # a single non-null member: report its own (more precise) error
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:
            raise errors[0]
        raise ConfigError(path, f"expected {type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping (section {tp.__name__}), got {value!r}")
        return build(tp, value, path)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {value!r}")
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(path, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        return {k: _convert(val_tp, v, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept it, since users write it.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")


def build(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    sections = open_sections(cls)
    moved = getattr(cls, "MOVED_KEYS", {})
    for key in data:
        if key not in fields and key not in sections:
            if key in moved:
                raise ConfigError(_join(path, str(key)), f"this key moved: write {_join(path, moved[key])}")
            known = [*fields, *sections]
            raise ConfigError(_join(path, str(key)), f"unknown key{suggest(str(key), known)}; "
                              f"known keys here: {', '.join(known)}")
    kwargs = {name: _convert(hints[name], data[name], _join(path, name)) for name in fields if name in data}
    for name, f in fields.items():
        if name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(_join(path, name), "required key is missing")
    obj = cls(**kwargs)
    for name, section_cls in sections.items():
        if name in data:
            obj._sections[name] = _convert(section_cls, data[name], _join(path, name))
    return obj


def open_sections(cls: type) -> dict[str, type]:
    """{name: dataclass} of the sections a config class takes beyond its fields (a registry's
    plug-in sections, e.g. `data.<source>`): the class's `open_sections()`, kept in `_sections`."""
    return cls.open_sections() if hasattr(cls, "open_sections") else {}


def section_values(obj: Any) -> dict[str, Any]:
    """The open sections of a config object (see open_sections), by name."""
    return dict(getattr(obj, "_sections", {}) or {})


def validate_tree(obj: Any, path: str = "") -> None:
    """Call `validate(path)` on every dataclass in the tree, children first."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            validate_tree(value, _join(path, f.name))
        elif isinstance(value, dict):
            for k, v in value.items():
                validate_tree(v, _join(_join(path, f.name), str(k)))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                validate_tree(v, f"{_join(path, f.name)}[{i}]")
    for name, value in section_values(obj).items():
        validate_tree(value, _join(path, name))
    if hasattr(obj, "validate"):
        obj.validate(path)


def to_dict(obj: Any) -> Any:
    """Plain-Python (YAML-safe) view of a config tree."""
    if dataclasses.is_dataclass(obj):
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        out.update({name: to_dict(v) for name, v in section_values(obj).items()})
        return out
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)
