"""Which weights and which data a downstream run (``finetune``, ``detect``, ``segment``) trains on.

A downstream run folder is ``RUN/<command>-<data>-<hash>-<weights>/`` and its results
``RUN/eval/<command>-<data>-<hash>-<weights>.json``: ``<data>`` is a readable name (the built-in
set, the manifest's file name, the ``detect.root`` / ``segment.root`` folder's name) and
``<hash>`` the first 8 hex digits of the SHA-256 of :func:`data_identity` (data set, absolute
paths, vocabulary, generator seed, and ``detect.root`` / ``segment.root``), so that two data sets
never share a folder or a result file. The folder's ``identity.json`` and every checkpoint record
:func:`run_identity`: the command, the source weights' label and the SHA-256 of their tensors,
and the data identity. A resume whose source weights or data differ is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from hvpmtl.config import ConfigError
from hvpmtl.engine.run_dir import IDENTITY_FILE

# which images and which tags: the keys that name the data (sizes, batch and loading settings do not)
DATA_KEYS = ("dataset", "root", "manifest", "val_manifest", "classes", "classes_file", "annotations", "val_annotations",
             "dictionary", "shards", "val_shards", "min_confidence", "voc_difficult", "seed", "label_noise",
             "item_scale", "synthetic_tags", "emoji_min_count")  # fmt: skip
PATH_KEYS = ("root", "manifest", "val_manifest", "classes_file", "annotations", "val_annotations", "dictionary",
             "shards", "val_shards")  # fmt: skip
ROOT_BLOCKS = ("detect", "segment")  # their ``root``: the COCO / ADE20K folder read instead of data.*


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else ""


def data_identity(cfg: Any) -> dict:
    """The data a command config reads, as ``{dotted key: value}`` with absolute paths."""
    out = {}
    for key in DATA_KEYS:
        value = getattr(cfg.data, key, None)
        value = _absolute(value) if key in PATH_KEYS else value
        out[f"data.{key}"] = list(value) if isinstance(value, (list, tuple)) else value
    for block in ROOT_BLOCKS:
        if root := getattr(getattr(cfg, block, None), "root", ""):
            out[f"{block}.root"] = _absolute(root)
    return out


def short_hash(value: Any) -> str:
    """First 8 hex digits of the SHA-256 of ``value`` as sorted JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]


def data_tag(cfg: Any) -> str:
    """``<readable name>-<hash of data_identity>`` for folder and result names."""
    from hvpmtl.eval.report import data_label

    root = next((r for b in ROOT_BLOCKS if (r := getattr(getattr(cfg, b, None), "root", ""))), "")
    label = Path(_absolute(root)).name if root else data_label(cfg.data)
    return f"{re.sub(r'[^A-Za-z0-9_.+-]+', '-', label).strip('-') or 'data'}-{short_hash(data_identity(cfg))}"


def source_digest(weights: Any) -> str:
    """SHA-256 of the source backbone tensors as loaded (names, dtypes, shapes, bytes); for a random
    initialisation, of its backbone config and seed (which fix those weights)."""
    digest = hashlib.sha256()
    if weights.state is None:
        digest.update(json.dumps({"random_init": asdict(weights.backbone), "seed": weights.seed}, sort_keys=True,
                                 default=str).encode())  # fmt: skip
        return digest.hexdigest()
    for name in sorted(weights.state):
        t = weights.state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_identity(command: str, cfg: Any, weights: Any) -> dict:
    """What a downstream run's checkpoints and ``identity.json`` record (module docstring)."""
    return {"command": command, "source": weights.label, "source_sha256": source_digest(weights),
            "data": data_identity(cfg)}  # fmt: skip


def check_resume_identity(saved: dict | None, current: dict, path: str | Path) -> str | None:
    """:class:`~hvpmtl.config.ConfigError` (one line) when the checkpoint at ``path`` was trained
    from other source weights or on other data; a warning line when it records neither."""
    if not saved:
        return f"warning: {path} records no source weights or data (written by an older version): not checked"
    again = "start a new run with --overwrite (train.overwrite=true), or choose another train.output_dir"
    if saved.get("source_sha256") != current["source_sha256"]:
        raise ConfigError(
            f"{path}: trained from other source weights ({saved.get('source')}, sha256 "
            f"{str(saved.get('source_sha256'))[:12]}) than {current['source']} (sha256 "
            f"{current['source_sha256'][:12]}): the source changed since; {again}"
        )
    old, new = saved.get("data") or {}, current["data"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise ConfigError(f"{path}: trained on other data ({key}: {old.get(key)!r} then, {new.get(key)!r} now); "
                              f"{again}")  # fmt: skip
    return None


def write_identity(run_dir: str | Path, identity: dict) -> None:
    """``run_dir/identity.json`` (atomic)."""
    from hvpmtl.engine.checkpoint import atomic_write

    text = json.dumps(identity, indent=1) + "\n"
    atomic_write(Path(run_dir) / IDENTITY_FILE, lambda f: f.write(text.encode("utf-8")))
