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

Each format is a data source (``data.dataset=coco`` ...), registered below with
:func:`hvpmtl.data.sources.register_source` like the built-in ones (:func:`build_format_dataset`:
``data.annotations`` for train, ``data.val_annotations`` for val and test, ``data.root``, the given
vocabulary and the keys of :data:`_READER_OPTIONS`, the format's own).

>>> ds = READERS["voc"]("VOC2007/ImageSets/Main/trainval.txt")
>>> ds.classes[:2], ds[0]["labels"].shape, ds[0]["boxes"].shape  # (['aeroplane', 'bicycle'], (20,), (N, 4))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
from hvpmtl.data.loading import ImageLoading
from hvpmtl.data.sources import listed_file, register_source, vocabulary

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

READERS: dict[str, type[FormatImages]] = {  # the reader class of each format source
    "coco": CocoImages,
    "voc": VocImages,
    "openimages": OpenImagesLabels,
    "tencent": TencentImages,
}


_READER_OPTIONS: dict[str, Callable[[DataConfig], dict[str, Any]]] = {  # the data.* keys one format reads
    "coco": lambda cfg: {},
    "voc": lambda cfg: {"difficult": cfg.voc_difficult},
    "openimages": lambda cfg: {"descriptions": cfg.dictionary or None, "min_confidence": cfg.min_confidence,
                               "unannotated": cfg.unannotated},  # fmt: skip
    "tencent": lambda cfg: {"dictionary": cfg.dictionary or None, "min_confidence": cfg.min_confidence},
}


def build_format_dataset(
    cfg: DataConfig, split: str, classes: Sequence[str] | None, loading: ImageLoading | None = None
) -> FormatImages:
    """The ``split`` of format ``cfg.dataset`` (a key of :data:`READERS`): ``data.annotations`` for train,
    ``data.val_annotations`` for val and test; ``classes`` is the given vocabulary or None; images load
    as ``loading`` says (default: ``ImageLoading.from_config(cfg)``)."""
    if cfg.dataset not in READERS:
        raise ValueError(f"data.dataset={cfg.dataset}: not a format (choose from {', '.join(READERS)})")
    path = listed_file(cfg, split, "annotations", "val_annotations")
    if cfg.dictionary and not Path(cfg.dictionary).is_file():
        raise FileNotFoundError(f"data.dictionary: file not found: {cfg.dictionary}")
    try:
        return READERS[cfg.dataset](path, cfg.root, classes, check_files=cfg.check_files,
                                    missing_images=cfg.missing_images, loading=loading or ImageLoading.from_config(cfg),
                                    **_READER_OPTIONS[cfg.dataset](cfg))  # fmt: skip
    except VocabularyError as err:
        source = "data.classes_file" if cfg.classes_file else "data.classes"
        raise VocabularyError(f"{source}: {err}") from err


def _format_source(cfg: DataConfig, split: str, img_size: int, loading: ImageLoading) -> FormatImages:
    """The builder of every format source: the given vocabulary, then :func:`build_format_dataset`."""
    return build_format_dataset(cfg, split, vocabulary(cfg), loading)


for _name in READERS:
    register_source(_name)(_format_source)
