"""Typed configuration: dataclasses, YAML presets and ``key=value`` overrides.

A preset holds only its differences from the dataclass defaults (which are the paper's values,
except the global batch: ``data.batch_size`` defaults to 64, the ``paper-*`` presets set 1024).
Every key is checked against the dataclass tree: an unknown key, a value of the wrong type or a
non-finite number fails at once with the dotted key's name, e.g. ``optim.lr: expected float, got
'fast'``. The backbone is built on PyTorch's meta device while the config loads, so a timm
argument or a patch size that cannot work is reported before anything runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hvpmtl.backbones import BackboneConfig
from hvpmtl.config_io import (  # noqa: F401  (re-exported: hvpmtl.config is their public home)
    RETIRED_KEYS,
    ConfigError,
    _merge,
    coerce_value,
    from_dict,
    to_dict,
)
from hvpmtl.data.config import DataConfig, check_source_keys
from hvpmtl.engine.config import DistConfig, MonitorConfig, OptimConfig, TrainConfig
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
    """Write ``cfg`` to ``path`` as YAML, every key in order; ``load_config(path)`` reads it back."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
