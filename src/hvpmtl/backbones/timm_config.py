"""timm's own description of exported backbone weights: the ``config.json`` of timm's Hub format
(``architecture``, ``num_classes``, ``num_features``, ``model_args``, ``pretrained_cfg``),
written by timm's public ``timm.models.save_for_hf`` with the run's preprocessing, so that

    model = timm.create_model("local-dir:RUN/timm", pretrained=True)
    timm.data.resolve_model_data_config(model)  # the run's img_size, mean, std, crop_pct

rebuilds the backbone and the way its images were prepared. A run folder's ``model.safetensors``
(student and teacher) is not a timm state dict, so each exported backbone gets a folder of its
own: ``timm/`` (the student) and ``timm_teacher/``, each a ``config.json`` and a
``model.safetensors`` that is a hard link to ``backbone.safetensors`` (no second copy on disk;
a copy where the file system has no hard links).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from hvpmtl.config_io import from_dict
from hvpmtl.data.config import DataConfig

# exported backbone file stem (engine/checkpoint.py:export_weights) -> its timm folder in the run
TIMM_FOLDERS = {"backbone": "timm", "teacher_backbone": "timm_teacher"}
# fields of pretrained_cfg that describe timm's published weights for the name, not these
PROVENANCE = ("tag", "license", "description", "origin_url", "paper_name", "paper_ids", "notes")


def backbone_pretrained_cfg(config: dict) -> dict:
    """The timm ``config.json`` for the backbone of a run's resolved config (``to_dict(cfg)``
    or a run's ``config.yaml``): the model arguments that rebuild it and, in ``pretrained_cfg``,
    the preprocessing of the run's evaluation images (``backbone.img_size``, ``data.mean``,
    ``data.std``, ``data.eval_crop_pct``, centre crop after a bilinear resize). ``ValueError``
    naming the key when timm cannot rebuild the backbone from a config."""
    import timm

    from hvpmtl.backbones import BackboneConfig, timm_kwargs

    backbone = from_dict(BackboneConfig, config.get("backbone", {}), "backbone")
    if backbone.stem_channels:  # a partial of hvpmtl's own embedding: a config.json cannot name it
        raise ValueError(
            f"backbone.stem_channels={list(backbone.stem_channels)}: timm cannot rebuild a convolutional stem "
            "from a config.json; load the weights with hvpmtl.load_backbone"
        )
    with torch.device("meta"):  # the model's description only: no memory, no initialisation
        model = timm.create_model(backbone.name, pretrained=False, **timm_kwargs(backbone))
    with tempfile.TemporaryDirectory() as tmp:  # timm's writer; its meta-tensor weights file is dropped
        timm.models.save_for_hf(model, tmp, safe_serialization=False, data_config=preprocessing(config))
        hf_config = json.loads((Path(tmp) / "config.json").read_text())
    for key in PROVENANCE:
        hf_config["pretrained_cfg"].pop(key, None)
    return hf_config


def preprocessing(config: dict) -> dict:
    """timm's data config of the run's evaluation images (a run's resolved config as a dict):
    ``backbone.img_size``, ``data.mean``, ``data.std``, ``data.eval_crop_pct``, a centre crop
    after a bilinear resize; defaults where the config has no data block (a lone backbone file)."""
    data, defaults = config.get("data") or {}, DataConfig()
    size = int((config.get("backbone") or {}).get("img_size", 224))
    return {
        "input_size": (3, size, size),
        "mean": tuple(data.get("mean", defaults.mean)),
        "std": tuple(data.get("std", defaults.std)),
        "crop_pct": float(data.get("eval_crop_pct", defaults.eval_crop_pct)),
        "crop_mode": "center",
        "interpolation": "bilinear",  # data/views.py:EvalTransform resizes with torchvision's default
    }


def write_timm_export(folder: Path, state: dict[str, torch.Tensor], config: dict, metadata: dict[str, str]) -> Path:
    """``folder/model.safetensors`` (``state``: timm keys, ``metadata`` as a backbone file's) and
    ``folder/config.json`` (:func:`backbone_pretrained_cfg`): what ``timm.models.save_for_hf`` writes.
    ``ValueError`` before anything is written when timm cannot rebuild the backbone from a config."""
    from safetensors.torch import save as st_save

    from hvpmtl.files import atomic_write

    text = json.dumps(backbone_pretrained_cfg(config), indent=2) + "\n"
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    atomic_write(folder / "model.safetensors", lambda f: f.write(st_save(tensors, metadata=metadata)))
    atomic_write(folder / "config.json", lambda f: f.write(text.encode()))
    return folder


def write_timm_folders(run_dir: Path, exported: dict[str, Path], config: dict) -> dict[str, Path]:
    """For each exported backbone file (``exported``: stem -> path), the folder
    ``timm.create_model("local-dir:...")`` reads; returns ``folder name -> path``. A backbone
    timm cannot rebuild from a config gets no folder and one printed line saying why."""
    from hvpmtl.files import atomic_write

    parts = [name for name in TIMM_FOLDERS if name in exported]
    if not parts:
        return {}
    try:
        text = json.dumps(backbone_pretrained_cfg(config), indent=2) + "\n"
    except ValueError as err:
        print(f"no {'/, '.join(TIMM_FOLDERS[n] for n in parts)}/ written for timm: {err}")
        return {}
    folders = {}
    for name in parts:
        folder = run_dir / TIMM_FOLDERS[name]
        atomic_write(folder / "config.json", lambda f: f.write(text.encode()))
        _link_or_copy(exported[name], folder / "model.safetensors")
        folders[TIMM_FOLDERS[name]] = folder
    return folders


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` as a hard link (a copy where that fails), replacing ``dst`` at once."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")  # the name atomic_write's cleanup knows
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network or FAT file systems)
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
