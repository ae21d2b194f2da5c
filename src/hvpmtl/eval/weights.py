"""What a downstream command evaluates: backbone weights from a run, a checkpoint or a file.

Every downstream command takes one ``SOURCE``:

* a run folder: its ``backbone.safetensors`` (student) or ``teacher_backbone.safetensors``
  (``--teacher``; ``model.safetensors`` for runs older than that file), or, for a run that has not
  finished, its latest checkpoint;
* a checkpoint ``checkpoints/step_*.pt`` (loaded with ``weights_only=True``);
* a ``backbone.safetensors`` or ``teacher_backbone.safetensors`` (timm keys; the backbone config
  and which part it is are stored in the file) or a ``model.safetensors`` (student and teacher);
* nothing, with ``--random-init`` and ``--config PRESET``: the backbone a pre-training preset
  starts from.

``--random-init`` with a source gives the very weights that run started from (same config, same
``train.seed``): the baseline every results table needs. (For a run that started from pretrained
weights or another run, ``backbone.pretrained*`` / ``init_from``, it is the random initialisation
those replaced.) Weights that do not fit the backbone
(missing or unexpected keys, other shapes) stop the command with the names of what differs.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from hvpmtl.backbones import BackboneConfig, MaskedBackbone, build_backbone
from hvpmtl.backbones.pretrained import describe_mismatch

STUDENT, TEACHER = "backbone.model.", "teacher.backbone.model."


class WeightsError(ValueError):
    """The source cannot be read as backbone weights, or they do not fit the backbone."""


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


def _backbone_cfg(d: dict) -> BackboneConfig:
    from hvpmtl.config import from_dict

    return from_dict(BackboneConfig, d, "backbone")


def _prefixed(state: dict, prefix: str, where: str) -> dict[str, torch.Tensor]:
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    if not out:
        kind = "teacher (was momentum distillation on?)" if prefix == TEACHER else "student backbone"
        raise WeightsError(f"{where}: holds no {kind} weights (no keys starting with '{prefix}')")
    return out


def _from_checkpoint(path: Path, teacher: bool) -> tuple[dict, dict, str, str]:
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
    state = _prefixed(ckpt["model"], TEACHER if teacher else STUDENT, str(path))
    return state, ckpt.get("config", {}), f"step {ckpt.get('step', '?')}", "teacher" if teacher else "student"


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


def _from_safetensors(path: Path, teacher: bool) -> tuple[dict, dict, str, str]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
    if meta.get("format") == "hvpmtl":  # model.safetensors: student and teacher
        config = metadata_json(meta, "config", path)
        return (
            _prefixed(state, TEACHER if teacher else STUDENT, str(path)),
            config,
            f"step {meta.get('iteration', '?')}",
            "teacher" if teacher else "student",
        )
    part = meta.get("part", "student")
    if teacher and part != "teacher":
        raise WeightsError(
            f"{path}: holds the student's backbone, not a teacher; for --teacher pass the run's "
            "teacher_backbone.safetensors (or its model.safetensors)"
        )
    if "backbone_config" in meta:
        return state, {"backbone": metadata_json(meta, "backbone_config", path)}, "", part
    raise WeightsError(
        f"{path}: no backbone config in its metadata (not written by hvpmtl); give the backbone with "
        "--config PRESET (pre-training preset) and this file as a timm state dict is not supported yet"
    )


def _in_run(run: Path, teacher: bool) -> Path:
    from hvpmtl.engine.checkpoint import find_latest

    names = ("teacher_backbone.safetensors", "model.safetensors") if teacher else ("backbone.safetensors",)
    for name in names:
        if (run / name).is_file():
            return run / name
    final = run / names[0]
    latest = find_latest(run)
    if latest is None:
        raise WeightsError(
            f"{run}: no {final.name} and no checkpoint in {run / 'checkpoints'}: not an hvpmtl run folder"
        )
    return latest


def resolve_weights(
    source: str | Path | None,
    teacher: bool = False,
    random_init: bool = False,
    pretrain_preset: str | None = None,
) -> Weights:
    """The :class:`Weights` that ``SOURCE`` (and the flags, as in the module docstring) names."""
    if source is None or str(source) == "":
        if not random_init:
            raise WeightsError(
                "give a run folder, a checkpoint or a .safetensors file (or --random-init --config PRESET)"
            )
        from hvpmtl.config import load_config, to_dict

        cfg = load_config(pretrain_preset or "cpu-tiny")
        name = pretrain_preset or "cpu-tiny"
        return Weights(cfg.backbone, None, f"random init ({name})", None, to_dict(cfg), cfg.train.seed)
    path = Path(source)
    if not path.exists():
        raise WeightsError(f"{path}: no such run folder or weights file")
    run_dir = path if path.is_dir() else (path.parent.parent if path.parent.name == "checkpoints" else path.parent)
    if path.is_dir():
        path = _in_run(path, teacher)
    if path.suffix == ".pt":
        state, config, when, part = _from_checkpoint(path, teacher)
    elif path.suffix == ".safetensors":
        state, config, when, part = _from_safetensors(path, teacher)
    else:
        raise WeightsError(f"{path}: expected a run folder, a .pt checkpoint or a .safetensors file")
    if "backbone" not in config:
        raise WeightsError(f"{path}: no backbone config stored with the weights")
    config_file = path
    if "train" not in config:  # a backbone file stores only its backbone: the run's config.yaml has the rest
        config = {**_run_config(run_dir), "backbone": config["backbone"]}
        config_file = run_dir / "config.yaml"
    seed = _train_seed(config, config_file)
    if random_init:
        return Weights(_backbone_cfg(config["backbone"]), None, f"random init ({run_dir.name})", run_dir, config, seed)
    label = " ".join(x for x in (run_dir.name, part, when) if x)
    return Weights(_backbone_cfg(config["backbone"]), state, label, run_dir, config or None, seed, part)


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


def _run_config(run_dir: Path) -> dict:
    """``run_dir/config.yaml`` (the run's resolved pre-training config: data, ``train.seed``), or
    ``{}`` when the weights file stands outside a run folder."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise WeightsError(f"{path}: not a readable config ({err})") from None
    return config if isinstance(config, dict) else {}


def _fit_pos_embed(state: dict, model: nn.Module) -> dict:
    """Resample a ViT's absolute position embedding to the model's grid (other image sizes)."""
    pos = state.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or target is None or pos.shape == target.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    grid = model.patch_embed.grid_size
    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(pos, list(grid), num_prefix_tokens=prefix)
    return state


def load_into(
    model: nn.Module, state: dict[str, torch.Tensor], where: str, allow_missing: tuple[str, ...] = ()
) -> None:
    """Load timm-keyed ``state`` into the timm ``model``; mismatches raise :class:`WeightsError`
    naming them. Keys starting with one of ``allow_missing`` (a new head) may be missing."""
    check_tensors(state, model.state_dict(), where)
    state = _fit_pos_embed(state, model)
    problem = describe_mismatch(model.state_dict(), state, allow_missing)
    if problem is not None:
        raise WeightsError(f"{where}: the weights do not fit this backbone ({problem})")
    model.load_state_dict(state, strict=False)


def check_tensors(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: str) -> None:
    """:class:`WeightsError` naming the first tensor of ``state`` that is not finite, or that is
    stored as integers where the model (state dict ``own``) holds floats: ``load_state_dict``
    would cast it silently, and either would be evaluated as if it were trained weights."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):  # extra state (e.g. a module's _extra_state dict)
            continue
        target = own.get(key)
        if isinstance(target, torch.Tensor) and target.is_floating_point() and not value.is_floating_point():
            raise WeightsError(
                f"{where}: tensor {key} is {value.dtype} where the model has {target.dtype}; "
                "integer weights are not cast, nothing was loaded"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise WeightsError(
                f"{where}: tensor {key} is not finite ({bad} of {value.numel()} values NaN or inf); nothing was loaded"
            )


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
