"""Typed configuration: dataclasses, YAML presets and ``key=value`` overrides.

A preset holds only its differences from the dataclass defaults (which are the paper's values,
except the global batch: ``data.batch_size`` defaults to 64, the ``paper-*`` presets set 1024).
Every key is checked against the dataclass tree: an unknown key, a value of the wrong type or a
non-finite number fails at once with the dotted key's name, e.g. ``optim.lr: expected float, got
'fast'``. The backbone is built on PyTorch's meta device while the config loads, so a timm
argument or a patch size that cannot work is reported before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from hvpmtl.backbones import BackboneConfig
from hvpmtl.data.config import DataConfig, check_source_keys
from hvpmtl.engine.config import DistConfig, OptimConfig, TrainConfig
from hvpmtl.eval.config import MonitorConfig
from hvpmtl.objectives import RoutingConfig, TasksConfig, objective_types  # noqa: F401  (RoutingConfig: re-export)
from hvpmtl.reprs import short_repr

PRESET_DIR = Path(__file__).parent / "configs"


class _AliasError(yaml.YAMLError):
    """A YAML alias (``*name``) in a config: refused, because a few nested aliases stand for
    billions of values once a check or an error message walks them."""

    def __init__(self, anchor: str, line: int):
        super().__init__(f"YAML alias *{anchor}: aliases are not allowed in config files (write the value out)")
        self.line = line


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: ``1e-4`` is a number (YAML 1.1 reads it as a string). Aliases are refused."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasError(event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class ConfigError(ValueError):
    """A config key is unknown, its value has the wrong type, or a config file cannot be read."""


# ``tasks``: RoutingConfig and TasksConfig (one block per registered objective) live in
# hvpmtl.objectives.base; an objective's own file adds its block.


@dataclass
class Config:
    """The whole run: model (backbone + tasks), data, optimisation, loop, distribution and the
    k-NN monitor."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: MonitorConfig = field(default_factory=MonitorConfig)

    def validate(self, prefix: str = "") -> None:
        """Checks across blocks, each objective's own (MIM: the mask units must tile the image and
        the token grid)."""
        for objective in objective_types().values():
            objective.check_config(self)


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


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


def parse_override(text: str) -> dict:
    """``"optim.lr=2e-4"`` -> ``{"optim": {"lr": 2e-4}}`` (the value read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except _AliasError as err:
        raise ConfigError(f"{key}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot read value {short_repr(raw)}: {err}") from err
    node: dict = {}
    root = node
    parts = key.split(".")
    for p in parts[:-1]:
        node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return root


def preset_names(preset_dir: Path = PRESET_DIR) -> list[str]:
    return sorted(p.stem for p in preset_dir.glob("*.yaml"))


def _read_yaml(path: Path, preset_dir: Path = PRESET_DIR, chain: tuple[Path, ...] = ()) -> dict:
    """One YAML file merged over its ``base:`` chain; ``chain`` holds the files that include it."""
    chain = (*chain, path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from err
    try:
        data = yaml.load(text, Loader=_Loader) or {}
    except _AliasError as err:
        raise ConfigError(f"{path}:{err.line}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: base must be a preset name or a YAML path, got {short_repr(base)}")
        base_path = _resolve(base, path.parent, preset_dir)
        if base_path.resolve() in {p.resolve() for p in chain}:
            cycle = " -> ".join(p.name for p in (*chain, base_path))
            raise ConfigError(f"{path}: base cycle: {cycle}")
        data = _merge(_read_yaml(base_path, preset_dir, chain), data)
    return data


def _resolve(name_or_path: str, relative_to: Path | None = None, preset_dir: Path = PRESET_DIR) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_absolute() and relative_to is not None and (relative_to / p).exists():
            p = relative_to / p
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        return p
    preset = preset_dir / f"{name_or_path}.yaml"
    if not preset.exists():
        raise ConfigError(f"unknown preset '{name_or_path}' (presets: {', '.join(preset_names(preset_dir))})")
    return preset


def load_config(
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    cls: type = Config,
    preset_dir: Path = PRESET_DIR,
    base: dict | None = None,
) -> Any:
    """Defaults <- ``base`` <- preset (a name under ``preset_dir`` or a YAML path) <- ``key=value``
    overrides, as dataclass ``cls`` (the pre-training ``Config`` by default; the downstream
    commands pass their own config class and preset folder). A ``data.*`` key of one data source
    set under another ``data.dataset`` is refused (:func:`hvpmtl.data.config.check_source_keys`)."""
    data: dict = dict(base or {})
    if preset:
        data = _merge(data, _read_yaml(_resolve(preset, None, preset_dir), preset_dir))
    preset_data = data.get("data") if isinstance(data.get("data"), dict) else {}
    given: dict = {}
    for text in overrides:
        override = parse_override(text)
        data, given = _merge(data, override), _merge(given, override)
    cfg = from_dict(cls, data)
    if isinstance(getattr(cfg, "data", None), DataConfig):
        try:  # here, not in DataConfig.validate: a run's saved config must load as it was written
            given_data = given.get("data") if isinstance(given.get("data"), dict) else {}
            cfg.data = check_source_keys(cfg.data, set(given_data), preset_data.get("dataset", DataConfig.dataset))
        except ValueError as err:
            raise ConfigError(str(err)) from err
    return cfg


def explicit_keys(
    preset: str | None, overrides: list[str] | tuple[str, ...] = (), preset_dir: Path = PRESET_DIR
) -> set:
    """Dotted keys a preset and overrides set explicitly (e.g. ``{"data.dataset", "optim.lr"}``)."""
    data: dict = _read_yaml(_resolve(preset, None, preset_dir), preset_dir) if preset else {}
    for text in overrides:
        data = _merge(data, parse_override(text))

    def walk(d: dict, prefix: str) -> set:
        keys = set()
        for k, v in d.items():
            keys.add(prefix + str(k))
            if isinstance(v, dict):
                keys |= walk(v, f"{prefix}{k}.")
        return keys

    return walk(data, "")


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
