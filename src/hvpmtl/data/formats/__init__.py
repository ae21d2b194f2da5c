"""Readers for the formats multi-label data comes in, one file each, all yielding the manifest's sample.

* ``coco``: ``data.annotations`` = ``annotations/instances_<split>.json``; classes from its ``categories``.
* ``voc``: ``ImageSets/Main/<split>.txt``; classes from the ``<object>`` names (or the given ones).
* ``openimages``: ``<split>-annotations-human-imagelabels.csv``; classes from the class-descriptions CSV
  (``data.dictionary``, found beside it by default).
* ``tencent``: an image list ``<file> <index:confidence> ...``; classes from
  ``dictionary_and_semantic_hierarchy.txt`` (``data.dictionary``, found beside it by default).

Every reader is a :class:`FormatImages` (so an :class:`hvpmtl.data.manifest.ImageFiles`): items
``{"image": uint8 3 x H x W, "labels": float C multi-hot, "index": i}`` plus ``boxes`` (float
``N x 4`` xyxy pixels) and ``box_labels`` (long ``N``) for ``coco`` and ``voc`` (and Open Images
with a box file), ``negatives`` (float ``C``) for ``openimages``; ``.classes`` are display names,
``.label_ids`` the format's ids. Each module's docstring gives its layout and choices.

>>> ds = READERS["voc"]("VOC2007/ImageSets/Main/trainval.txt")
>>> ds.classes[:2], ds[0]["labels"].shape, ds[0]["boxes"].shape  # (['aeroplane', 'bicycle'], (20,), (N, 4))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hvpmtl.data.config import DataConfig
from hvpmtl.data.formats.base import (
    MISSING_IMAGE_POLICIES,
    ClassEntry,
    FormatImages,
    ImageRecord,
    Vocabulary,
    VocabularyError,
    select_classes,
)
from hvpmtl.data.formats.coco import CocoImages
from hvpmtl.data.formats.openimages import OpenImagesLabels
from hvpmtl.data.formats.tencent import TencentImages
from hvpmtl.data.formats.voc import DIFFICULT_POLICIES, VocImages

__all__ = [
    "DIFFICULT_POLICIES",
    "MISSING_IMAGE_POLICIES",
    "READERS",
    "ClassEntry",
    "CocoImages",
    "FormatImages",
    "ImageRecord",
    "OpenImagesLabels",
    "TencentImages",
    "VocImages",
    "Vocabulary",
    "VocabularyError",
    "build_format_dataset",
    "select_classes",
]

READERS: dict[str, type[FormatImages]] = {
    "coco": CocoImages,
    "voc": VocImages,
    "openimages": OpenImagesLabels,
    "tencent": TencentImages,
}


def build_format_dataset(cfg: DataConfig, split: str, classes: Sequence[str] | None) -> FormatImages:
    """The ``split`` of ``cfg.dataset`` (a key of :data:`READERS`): ``data.annotations`` for train,
    ``data.val_annotations`` for val and test; ``classes`` is the given vocabulary or None."""
    key = "annotations" if split == "train" else "val_annotations"
    path = getattr(cfg, key)
    if not path:
        raise ValueError(f"data.{key}: not set (the {split} split of data.dataset={cfg.dataset} reads it)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"data.{key}: file not found: {path}")
    if cfg.root and not Path(cfg.root).is_dir():
        raise FileNotFoundError(f"data.root: folder not found: {cfg.root}")
    if cfg.dictionary and not Path(cfg.dictionary).is_file():
        raise FileNotFoundError(f"data.dictionary: file not found: {cfg.dictionary}")
    try:
        return READERS[cfg.dataset].from_config(cfg, Path(path), classes)
    except VocabularyError as err:
        source = "data.classes_file" if cfg.classes_file else "data.classes"
        raise VocabularyError(f"{source}: {err}") from err
