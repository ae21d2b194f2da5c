"""Data: readers, views and masks, from a ``DataConfig`` to the batches ``HVPMTL`` takes.

Public entry points:

* ``build_dataset(cfg_data, img_size, split="train")`` -> a data set with ``.classes`` whose
  items are dicts with at least ``image`` (uint8 ``3 x H x W``) and ``labels`` (float multi-hot
  ``C``); ``cfg_data.dataset`` picks ``synthetic``, ``manifest``, ``imagefolder``,
  ``fmnist-mosaic`` or ``fmnist`` (single items, for downstream evaluation), ``emoji`` (scenes of
  2-4 emoji tagged with their CLDR keywords: ~130 tags, ``hvpmtl.data.emoji``), or one of the users'
  formats ``coco``, ``voc``, ``openimages``, ``tencent`` (``hvpmtl.data.formats``). Splits:
  ``train``, ``val``, ``test``.
* ``build_view_transform(cfg)`` and ``build_eval_transform(cfg)`` take the root
  ``hvpmtl.config.Config`` (they read ``cfg.backbone.img_size``, ``cfg.tasks.mim`` and
  ``cfg.data``).
* ``data.augment_on=device``: ``build_view_transform`` gives ``TwoViewCrops`` (uint8 crops and
  the other steps' parameters per sample) and ``DeviceViews(transform)(batch, device)`` finishes
  a collated batch on the device.
* ``build_pretrain_dataset(cfg, split)`` = ``PretrainViews(build_dataset(...),
  build_view_transform(cfg), seed=cfg.train.seed)``; batch it with ``collate_pretrain``. Images it
  skips (``data.on_bad_image=skip``) are listed in ``cfg.train.output_dir``;
  ``skipped_images_summary(run_dir)`` merges that list and gives the line a run prints at its end.
* ``read_image(path, max_pixels)`` decodes any image file to uint8 RGB (``hvpmtl.data.decode``);
  unusable images raise ``BadImageError`` naming the file (and its manifest line).

Where each split comes from: generated sets (synthetic, fmnist-mosaic, emoji) use ``data.train_size``
/ ``data.val_size`` images from disjoint streams of ``data.seed``, with ``data.label_noise``
applied to the train split only (emoji: val and test scenes show only emoji that train scenes never
show); ``fmnist`` takes the first ``data.train_size`` (train) or
``data.val_size`` (val, test: the official test items) items, 0 meaning all; ``manifest``
reads ``data.manifest`` (train) or ``data.val_manifest``; ``imagefolder`` reads
``root/<split>`` when that folder exists, else ``root`` itself for train (and fails for val/test);
the users' formats read ``data.annotations`` (train) or ``data.val_annotations``; ``shards``
reads ``data.shards`` (train) or ``data.val_shards`` (``hvpmtl.data.shards``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from hvpmtl.data.config import DATASETS, FORMATS, DataConfig
from hvpmtl.data.decode import BadImageError
from hvpmtl.data.device_views import DeviceViews, TwoViewCrops
from hvpmtl.data.fmnist import DEFAULT_ROOT as FMNIST_ROOT
from hvpmtl.data.fmnist import FashionMNISTItems, FashionMNISTMosaic
from hvpmtl.data.formats import FormatImages, build_format_dataset
from hvpmtl.data.manifest import ImageFiles, ImageFolderImages, ManifestImages, read_class_names, read_image
from hvpmtl.data.masking import MaskGenerator, upsample_mask
from hvpmtl.data.skipped import skipped_images_summary
from hvpmtl.data.synthetic import SyntheticScenes, noisy_labels
from hvpmtl.data.views import (
    EvalImages,
    EvalTransform,
    PretrainViews,
    SeededItems,
    TwoViewTransform,
    collate_pretrain,
    reduced_decode_side,
    view_seed,
)

__all__ = [
    "DATASETS",
    "BadImageError",
    "DataConfig",
    "DeviceViews",
    "EvalImages",
    "EvalTransform",
    "FashionMNISTItems",
    "FashionMNISTMosaic",
    "ImageFiles",
    "ImageFolderImages",
    "ManifestImages",
    "MaskGenerator",
    "PretrainViews",
    "SeededItems",
    "SyntheticScenes",
    "TwoViewCrops",
    "TwoViewTransform",
    "build_dataset",
    "build_eval_transform",
    "build_pretrain_dataset",
    "build_view_transform",
    "collate_pretrain",
    "noisy_labels",
    "read_class_names",
    "read_image",
    "skipped_images_summary",
    "upsample_mask",
    "view_seed",
]

SPLITS = {"train": 0, "val": 1, "test": 2}  # also the stream of generated data sets


def _vocabulary(cfg: DataConfig) -> list[str] | None:
    if cfg.classes_file:
        try:
            return read_class_names(cfg.classes_file)
        except (OSError, ValueError) as err:
            raise ValueError(f"data.classes_file: {err}") from err
    return list(cfg.classes) or None


def _manifest(cfg: DataConfig, split: str) -> ManifestImages:
    key = "manifest" if split == "train" else "val_manifest"
    path = getattr(cfg, key)
    if not path:
        raise ValueError(f"data.{key}: not set (the {split} split of data.dataset=manifest reads it)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"data.{key}: file not found: {path}")
    if cfg.root and not Path(cfg.root).is_dir():
        raise FileNotFoundError(f"data.root: folder not found: {cfg.root}")
    return ManifestImages(path, cfg.root, _vocabulary(cfg), cfg.check_files, cfg.on_bad_image, cfg.max_image_pixels)


def _imagefolder(cfg: DataConfig, split: str) -> ImageFolderImages:
    root = Path(cfg.root)
    if not cfg.root or not root.is_dir():
        raise FileNotFoundError(f"data.root: folder not found: {cfg.root!r} (data.dataset=imagefolder)")
    if (root / split).is_dir():
        root = root / split
    elif split != "train":
        raise FileNotFoundError(f"data.root: no '{split}' folder in {cfg.root} (data.dataset=imagefolder)")
    try:
        ds = ImageFolderImages(root, cfg.on_bad_image, cfg.max_image_pixels)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.root: {err}") from err
    vocab = _vocabulary(cfg)
    if vocab is not None and vocab != ds.classes:
        raise ValueError(f"data.classes: {vocab} differ from the class folders of {root}: {ds.classes}")
    return ds


def build_dataset(cfg_data: DataConfig, img_size: int, split: str = "train") -> Dataset:
    """The ``split`` of the data set ``cfg_data`` describes (see the module docstring)."""
    cfg = cfg_data
    if split not in SPLITS:
        raise ValueError(f"split '{split}' unknown (choose from {', '.join(SPLITS)})")
    if cfg.dataset not in DATASETS:
        raise ValueError(f"data.dataset: unknown '{cfg.dataset}' (choose from {', '.join(DATASETS)})")
    size = cfg.train_size if split == "train" else cfg.val_size
    noise = cfg.label_noise if split == "train" else 0.0
    if cfg.dataset == "synthetic":
        ds: Any = SyntheticScenes(size, img_size, cfg.seed, SPLITS[split], noise, tags=cfg.synthetic_tags)
    elif cfg.dataset in ("fmnist-mosaic", "fmnist"):
        root = cfg.root or FMNIST_ROOT
        if not Path(root).is_dir():
            raise FileNotFoundError(
                f"data.root: folder not found: {root} ({cfg.dataset} needs the Fashion-MNIST IDX files; "
                "on Debian/Ubuntu: apt-get install dataset-fashion-mnist)"
            )
        try:
            if cfg.dataset == "fmnist":
                ds = FashionMNISTItems(root, split, size, img_size, cfg.item_scale)
            else:
                ds = FashionMNISTMosaic(root, split, size, img_size, cfg.seed, SPLITS[split], noise)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"data.root: {err}") from err
    elif cfg.dataset == "emoji":
        from hvpmtl.data.emoji import EmojiScenes  # Pillow's font code only where asked for

        ds = EmojiScenes(split, size, img_size, cfg.seed, SPLITS[split], noise, cfg.emoji_min_count)
    elif cfg.dataset == "manifest":
        ds = _manifest(cfg, split)
    elif cfg.dataset in FORMATS:
        ds = build_format_dataset(cfg, split, _vocabulary(cfg))
    elif cfg.dataset == "shards":
        from hvpmtl.data.shards import ShardImages, load_shard_index

        key = "shards" if split == "train" else "val_shards"
        index = load_shard_index(getattr(cfg, key), f"data.{key}", _vocabulary(cfg))
        ds = ShardImages(index, cfg.on_bad_image, cfg.max_image_pixels)
    else:
        ds = _imagefolder(cfg, split)
    if cfg.num_classes is not None and cfg.num_classes != len(ds.classes):
        raise ValueError(f"data.num_classes={cfg.num_classes} but the {cfg.dataset} data has {len(ds.classes)} classes")
    return ds


def build_view_transform(cfg: Any) -> TwoViewTransform:
    """Two views and a SimMIM mask, from a root ``Config`` (backbone size, tasks.mim, data); with
    ``data.augment_on=device`` the worker half only (``TwoViewCrops``: crops and parameters)."""
    d, mim = cfg.data, cfg.tasks.mim
    kind = TwoViewCrops if d.augment_on == "device" else TwoViewTransform
    return kind(
        cfg.backbone.img_size,
        mim.mask_patch_size,
        mim.mask_ratio,
        crop_scale=d.crop_scale,
        crop_ratio=d.crop_ratio,
        hflip=d.hflip,
        color_jitter=d.color_jitter,
        color_jitter_prob=d.color_jitter_prob,
        rotation=d.rotation,
        rand_augment=d.rand_augment,
        rand_augment_ops=d.rand_augment_ops,
        rand_augment_magnitude=d.rand_augment_magnitude,
        rand_augment_magnitude_std=d.rand_augment_magnitude_std,
        rand_augment_op_prob=d.rand_augment_op_prob,
        mean=d.mean,
        std=d.std,
    )


def build_eval_transform(cfg: Any) -> EvalTransform:
    """Resize, centre-crop and normalise, from a root ``Config``."""
    return EvalTransform(cfg.backbone.img_size, cfg.data.eval_crop_pct, cfg.data.mean, cfg.data.std)


def build_pretrain_dataset(cfg: Any, split: str = "train") -> Dataset:
    """``PretrainViews`` over ``build_dataset(cfg.data, ...)``, augmentations seeded by ``train.seed``
    (``data.dataset=shards``, train split: a streamed ``hvpmtl.data.shard_stream.ShardStream``)."""
    if cfg.data.dataset == "shards" and split == "train":
        from hvpmtl.data.shard_stream import pretrain_stream

        return pretrain_stream(cfg, _vocabulary(cfg.data), build_view_transform(cfg))
    base = build_dataset(cfg.data, cfg.backbone.img_size, split)
    _check_tags(base, cfg)
    if isinstance(base, ImageFiles):
        base.decode_min_side = reduced_decode_side(cfg)  # large JPEGs decode at what the views need
        base.io_threads = cfg.data.io_threads
        if cfg.train.output_dir:
            base.skip_log_dir = Path(cfg.train.output_dir)
    return PretrainViews(base, build_view_transform(cfg), seed=cfg.train.seed)


def _check_tags(base: Dataset, cfg: Any) -> None:
    """A manifest (or format) without a single tag cannot train the tasks that read tags (MLC, distillation)."""
    readers = [f"tasks.{t}" for t in ("mlc", "distill") if getattr(cfg.tasks, t).weight > 0]
    if isinstance(base, FormatImages) and base.num_tagged == 0 and readers:
        raise ValueError(
            f"{base.annotations}: no tags: none of the {len(base)} images has a positive label, and "
            f"{' and '.join(readers)} need tags (check data.min_confidence, data.voc_difficult, the vocabulary; "
            f"or set {' '.join(r + '.weight=0' for r in readers)})"
        )
    if isinstance(base, ManifestImages) and base.num_tagged == 0 and readers:
        raise ValueError(
            f"{base.manifest}: no tags: the 'labels' column is empty on all {len(base)} lines, and "
            f"{' and '.join(readers)} need tags (fill it: tags separated by '|'; or set "
            f"{' '.join(r + '.weight=0' for r in readers)})"
        )
