"""Config errors and dict <-> dataclass conversion with type checking.

The pieces every config block shares, below all packages: a block's own checks (the backbone's
timm arguments, a start-weights file) raise :class:`ConfigError` and read nested blocks with
:func:`from_dict` without importing the whole pre-training config. :mod:`hvpmtl.config`
re-exports all of them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Union

from hvpmtl.engine.config import TrainConfig
from hvpmtl.reprs import short_repr


class ConfigError(ValueError):
    """A config key is unknown, its value has the wrong type, or a config file cannot be read."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise :class:`ConfigError` naming ``key``; floats must be
    finite (``.inf`` and ``.nan`` are refused)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {short_repr(value)}")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {short_repr(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {short_repr(value)}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {short_repr(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            items = [coerce_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [coerce_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {short_repr(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {short_repr(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected int, got {short_repr(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {short_repr(value)}")
            return float(value)
        raise ConfigError(f"{key}: expected float, got {short_repr(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {short_repr(value)}")
    if typing.get_origin(tp) is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {typing.get_args(tp)}, got {short_repr(value)}")
    return value


# Removed keys, ``(dataclass, key) -> (old default, what replaces it)``: saved configs holding the
# default still load, any other value fails naming the replacement.
RETIRED_KEYS: dict[tuple[type, str], tuple[Any, str]] = {
    (TrainConfig, "stop_after"): (0, "the environment variable HVPMTL_FAULT_STOP_AFTER (tests only)"),
    (TrainConfig, "nan_at_step"): (-1, "the environment variable HVPMTL_FAULT_NAN_AT_STEP (tests only)"),
}


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (partial) mapping; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            retired = RETIRED_KEYS.get((cls, key))
            if retired is not None and value == retired[0]:
                continue  # a saved config of an earlier version: the old default means nothing
            if retired is not None:
                raise ConfigError(f"'{dotted}' is no longer a config key: use {retired[1]}")
            raise ConfigError(f"unknown config key '{dotted}' (known: {', '.join(sorted(fields))})")
        factory = fields[key].default_factory
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]) and factory is not dataclasses.MISSING:
            value = _merge(to_dict(factory()), value)  # a block's own defaults, then the given keys
        kwargs[key] = coerce_value(value, hints[key], dotted)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        try:
            obj.validate(prefix)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    return obj


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
