"""A pre-training run's outputs, read in one place: :class:`Run`.

A run is named by its folder, one of its checkpoints (``checkpoints/step_*.pt``, read with
``weights_only=True``) or one of its ``.safetensors`` files:

* ``model.safetensors``: the whole model (student, heads, teacher; its config and class names in
  the metadata);
* ``backbone.safetensors`` / ``teacher_backbone.safetensors``: one timm backbone (timm keys; its
  backbone config and which part it is in the metadata; the rest of the config is the run
  folder's ``config.yaml``).

In a folder, a backbone comes from its ``backbone.safetensors`` (student) or
``teacher_backbone.safetensors`` (``model.safetensors`` for runs older than that file), the whole
model from ``model.safetensors``, and for a run that has not finished from its latest checkpoint.
Everything that reads these files or works out a path's run folder goes through this module:
the downstream commands, the noise report, pictures, ``hvpmtl export``, ``hvpmtl.load_backbone``
and ``backbone.init_from``. A file that cannot be used stops with a one-line :class:`WeightsError`
naming it.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hvpmtl.backbones import BackboneConfig, MaskedBackbone, build_backbone
from hvpmtl.backbones.loading import WeightsError, check_tensors, load_into
from hvpmtl.backbones.pretrained import PARTS, StartWeights
from hvpmtl.config_io import from_dict
from hvpmtl.engine.checkpoint import CKPT_DIR
from hvpmtl.engine.vocabulary import CLASSES_FILE

STUDENT, TEACHER = "backbone.model.", "teacher.backbone.model."
MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.yaml"
BACKBONE_FILES = {"student": "backbone.safetensors", "teacher": "teacher_backbone.safetensors"}


@dataclass
class Weights:
    """Backbone weights (timm keys) and the config of the backbone they belong to.

    Attributes:
        backbone: the timm backbone config.
        state: timm-keyed tensors; ``None`` for a random initialisation.
        label: how results name these weights (e.g. ``"cpu-tiny student step 300"``).
        run_dir: the run folder the weights come from (results are written under it).
        pretrain: the run's resolved pre-training config as a dict, when known.
        seed: ``train.seed`` of the run (the random initialisation's seed).
        part: ``"student"`` or ``"teacher"``: which backbone of the run the weights are.
    """

    backbone: BackboneConfig
    state: dict[str, torch.Tensor] | None
    label: str
    run_dir: Path | None = None
    pretrain: dict | None = None
    seed: int = 0
    part: str = "student"


@dataclass
class _Stored:
    """What one weights file holds: ``whole`` (a checkpoint or model.safetensors: keys of the
    whole model) or one backbone (timm keys, ``part``)."""

    state: dict
    config: dict
    when: str
    whole: bool
    part: str = "student"
    class_names: list[str] | None = None


def run_folder(path: str | Path) -> Path:
    """The run folder of a run folder, one of its checkpoints or one of its files."""
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == CKPT_DIR else path.parent


def read_results(folder: str | Path) -> list[dict]:
    """The downstream results in ``folder/eval/*.json`` (command, weights, data, metrics), by file
    name; a file that is not one raises :class:`WeightsError` naming it. Also for a folder that
    holds only metrics and results (``hvpmtl visualize curves``)."""
    found = []
    for path in sorted((Path(folder) / "eval").glob("*.json")):
        try:
            record = json.loads(path.read_text())
            found.append({"command": record["command"], "weights": record["weights"], "data": record["data"],
                          "metrics": dict(record["metrics"])})  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise WeightsError(f"{path}: not a downstream result ({type(err).__name__}: {err})") from None
    return found


def check_part(part: str) -> str:
    if part not in PARTS:
        raise WeightsError(f"part={part!r}: choose student or teacher")
    return part


class Run:
    """The run that ``source`` (a run folder, checkpoint or ``.safetensors`` file) belongs to.

    ``folder``: the run folder; ``file``: the file given (``None`` for a folder). Files are read
    when first asked for and kept."""

    def __init__(self, source: str | Path):
        path = Path(source)
        if not path.exists():
            raise WeightsError(f"{path}: no such run folder or weights file")
        if path.is_file() and path.suffix not in (".pt", ".safetensors"):
            raise WeightsError(f"{path}: expected a run folder, a .pt checkpoint or a .safetensors file")
        if path.is_dir() and not any((path / n).exists() for n in (CONFIG_FILE, MODEL_FILE, CKPT_DIR,
                                                                    *BACKBONE_FILES.values())):  # fmt: skip
            raise WeightsError(
                f"{path}: no {CONFIG_FILE}, {MODEL_FILE}, {BACKBONE_FILES['student']} or {CKPT_DIR}/: "
                "not an hvpmtl run folder"
            )
        self.source, self.folder = path, run_folder(path)
        self.file = None if path.is_dir() else path
        self._read_files: dict[Path, _Stored] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.source)!r})"

    # ---- which file ---------------------------------------------------------------------------

    def weights_file(self, part: str = "student") -> Path:
        """The file ``part``'s backbone is read from: the file given, else the folder's backbone
        export (``model.safetensors`` for a teacher of runs older than teacher_backbone.safetensors),
        else its latest checkpoint."""
        if self.file is not None:
            return self.file
        names = (BACKBONE_FILES["teacher"], MODEL_FILE) if check_part(part) == "teacher" else (BACKBONE_FILES[part],)
        for name in names:
            if (self.folder / name).is_file():
                return self.folder / name
        return self._latest(f"no {names[0]} and no checkpoint in {self.folder / CKPT_DIR}")

    def model_file(self) -> Path:
        """The file the whole model is read from: the file given, else ``model.safetensors``, else
        the latest checkpoint."""
        if self.file is not None:
            return self.file
        if (self.folder / MODEL_FILE).is_file():
            return self.folder / MODEL_FILE
        return self._latest(f"no {MODEL_FILE} and no checkpoint")

    def _latest(self, missing: str) -> Path:
        from hvpmtl.engine.checkpoint import find_latest

        latest = find_latest(self.folder)
        if latest is None:
            raise WeightsError(f"{self.folder}: {missing}: not an hvpmtl run folder")
        return latest

    # ---- what the run holds -------------------------------------------------------------------

    @cached_property
    def config(self) -> dict:
        """The run's resolved pre-training config as a dict: the one stored with the file given
        (a backbone file's backbone block over the folder's ``config.yaml``), else ``config.yaml``,
        else the one stored with the whole model."""
        if self.file is not None:
            stored = self._read(self.file)
            if "train" in stored.config:
                return stored.config
            return {**self._config_yaml(), **stored.config}
        return self._config_yaml() or self._read(self.model_file()).config

    @property
    def class_names(self) -> list[str] | None:
        """The names of the MLC logits: stored with the model file, else ``classes.json``; ``None``
        for runs written before names were stored."""
        path = self.file if self.file is not None else self.folder / MODEL_FILE
        if path.is_file() and (names := self._read(path).class_names) is not None:
            return names
        path = self.folder / CLASSES_FILE
        return _names(path.read_text(encoding="utf-8"), path, "") if path.is_file() else None

    def results(self) -> list[dict]:
        """The downstream results of the run (:func:`read_results`)."""
        return read_results(self.folder)

    def weights(self, part: str = "student") -> Weights:
        """``part``'s backbone weights, its config and the run's (see :class:`Weights`)."""
        teacher = check_part(part) == "teacher"
        path = self.weights_file(part)
        stored = self._read(path)
        if stored.whole:
            state = _prefixed(stored.state, TEACHER if teacher else STUDENT, str(path))
            config, who = stored.config, part
        else:
            state, config, who = stored.state, stored.config, stored.part
            if teacher and who != "teacher":
                raise WeightsError(
                    f"{path}: holds the student's backbone, not a teacher; for --teacher pass the run's "
                    "teacher_backbone.safetensors (or its model.safetensors)"
                )
            if "backbone" not in config:
                raise WeightsError(
                    f"{path}: no backbone config in its metadata (not written by hvpmtl); give the backbone with "
                    "--config PRESET (pre-training preset) and this file as a timm state dict is not supported yet"
                )
        if "backbone" not in config:
            raise WeightsError(f"{path}: no backbone config stored with the weights")
        config_file = path
        if "train" not in config:  # a backbone file stores only its backbone: the run's config.yaml has the rest
            config = {**self._config_yaml(), "backbone": config["backbone"]}
            config_file = self.folder / CONFIG_FILE
        seed = _train_seed(config, config_file)
        label = " ".join(x for x in (self.folder.name, who, stored.when) if x)
        return Weights(_backbone_cfg(config["backbone"]), state, label, self.folder, config or None, seed, who)

    def start_weights(self, part: str = "student") -> StartWeights:
        """``part``'s backbone as a new run's start (``backbone.init_from``)."""
        weights = self.weights(part)
        return StartWeights(weights.state, weights.label, weights.backbone.name)

    def backbone(self, part: str = "student") -> MaskedBackbone:
        """``part``'s backbone in its pre-training adapter, weights loaded."""
        return build_masked_backbone(self.weights(part))

    def timm_model(self, part: str = "student") -> nn.Module:
        """``part``'s timm model in eval mode, weights loaded, with the run's preprocessing in its
        ``pretrained_cfg`` (``timm.data.resolve_model_data_config`` gives the run's values)."""
        from hvpmtl.backbones.timm_config import preprocessing

        weights = self.weights(part)
        model = build_masked_backbone(weights).model.eval()
        cfg = {**dict(getattr(model, "pretrained_cfg", None) or {}), **preprocessing(weights.pretrain or {})}
        cfg.pop("test_input_size", None)  # timm's published weights' test size, not the run's
        model.pretrained_cfg = model.default_cfg = cfg
        return model

    def model(self, device: str | torch.device = "cpu"):
        """The whole :class:`hvpmtl.HVPMTL` (student, heads, teacher) in eval mode and the run's
        :class:`hvpmtl.Config`. ``model.class_names`` holds the names of the MLC logits (None for
        files written before names were stored)."""
        from hvpmtl.config import Config
        from hvpmtl.hvp import HVPMTL

        path = self.model_file()
        stored = self._read(path)
        if not stored.whole:
            raise WeightsError(f"{path}: not an hvpmtl model.safetensors (the MLC head needs the whole model)")
        cfg = from_dict(Config, stored.config)
        model = HVPMTL(cfg.backbone, cfg.tasks, cfg.data.num_classes)
        check_tensors(stored.state, model.state_dict(), str(path))
        missing, unexpected = model.load_state_dict(stored.state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise WeightsError(
                f"{path}: weights do not fit the run's model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        model.class_names = list(stored.class_names) if stored.class_names is not None else None
        return model.to(device).eval(), cfg

    # ---- reading files ------------------------------------------------------------------------

    def _config_yaml(self) -> dict:
        """The folder's ``config.yaml``, or ``{}`` when the file stands outside a run folder."""
        path = self.folder / CONFIG_FILE
        if not path.is_file():
            return {}
        import yaml

        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise WeightsError(f"{path}: not a readable config ({err})") from None
        return config if isinstance(config, dict) else {}

    def _read(self, path: Path) -> _Stored:
        if path not in self._read_files:
            self._read_files[path] = _read_checkpoint(path) if path.suffix == ".pt" else _read_safetensors(path)
        return self._read_files[path]


def _read_checkpoint(path: Path) -> _Stored:
    from hvpmtl.engine.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except Exception as err:  # torch.load fails in many ways on a truncated or foreign file
        if isinstance(err, pickle.UnpicklingError):
            why = "not a weights-only PyTorch file"
        elif isinstance(err, ValueError):
            why = str(err).splitlines()[0]
        else:
            why = f"truncated or not a checkpoint ({type(err).__name__})"
        raise WeightsError(f"{path}: cannot read this checkpoint: {why}") from None
    names = ckpt.get("class_names")
    return _Stored(ckpt["model"], ckpt.get("config", {}), f"step {ckpt.get('step', '?')}", True,
                   class_names=list(names) if names is not None else None)  # fmt: skip


def _read_safetensors(path: Path) -> _Stored:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
    when = f"step {meta.get('iteration', '?')}"
    if meta.get("format") == "hvpmtl":  # model.safetensors: student, heads and teacher
        names = _names(meta["class_names"], path, "metadata ") if "class_names" in meta else None
        return _Stored(state, metadata_json(meta, "config", path), when, True, class_names=names)
    config = {"backbone": metadata_json(meta, "backbone_config", path)} if "backbone_config" in meta else {}
    return _Stored(state, config, "" if config else when, False, meta.get("part", "student"))


def metadata_json(meta: dict, key: str, path: Path) -> dict:
    """The JSON object stored under ``key`` of a safetensors file's metadata (``{}`` if absent);
    :class:`WeightsError` naming the file and key when it is not one."""
    try:
        value = json.loads(meta.get(key, "{}"))
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: metadata '{key}' is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: metadata '{key}' is not a JSON object")
    return value


def _names(text: str, path: Path, where: str) -> list[str]:
    """A JSON list of class names (``where``: ``"metadata "`` or ``""`` for classes.json)."""
    try:
        names = json.loads(text)
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: {where}'class_names' is not valid JSON ({err})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise WeightsError(f"{path}: {where}'class_names' is not a JSON list of names")
    return names


def _prefixed(state: dict, prefix: str, where: str) -> dict[str, torch.Tensor]:
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    if not out:
        kind = "teacher (was momentum distillation on?)" if prefix == TEACHER else "student backbone"
        raise WeightsError(f"{where}: holds no {kind} weights (no keys starting with '{prefix}')")
    return out


def _backbone_cfg(d: dict) -> BackboneConfig:
    return from_dict(BackboneConfig, d, "backbone")


def _train_seed(config: dict, where: Path) -> int:
    """``train.seed`` of a stored config (0 when absent); :class:`WeightsError` naming the file
    and key when it is not an integer (an edited config.yaml)."""
    train = config.get("train", {})
    if not isinstance(train, dict):
        raise WeightsError(f"{where}: train: expected a mapping of keys, got {str(train)[:50]!r}")
    seed = train.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise WeightsError(f"{where}: train.seed: expected an integer, got {str(seed)[:50]!r}")
    return seed


# ---- the model's parts, a backbone with its weights ---------------------------------------------


def model_part(model: Any, part: str, where: str | Path = "this model") -> tuple[nn.Module, nn.Module | None]:
    """The backbone and MLC decoder of an :class:`hvpmtl.HVPMTL`'s ``part`` (its EMA teacher's
    for ``"teacher"``); :class:`WeightsError` naming ``where`` when the run has no teacher."""
    if check_part(part) == "teacher":
        if model.teacher is None:
            raise WeightsError(f"{where}: no teacher (tasks.distill was off)")
        return model.teacher["backbone"], model.teacher["mlc"]
    return model.backbone, model.mlc


def build_masked_backbone(weights: Weights, **overrides) -> MaskedBackbone:
    """The pre-training adapter (feature map + pooled feature) with ``weights`` loaded;
    ``overrides`` change backbone config fields (e.g. ``img_size``, ``drop_path_rate``).
    A random initialisation is seeded with the run's ``train.seed``, as pre-training was."""
    cfg = replace(weights.backbone, **overrides)
    if weights.state is None:
        torch.manual_seed(weights.seed)  # HVPMTL builds the backbone first: the same weights
        return build_backbone(cfg)
    backbone = build_backbone(cfg)
    load_into(backbone.model, weights.state, weights.label)
    return backbone
